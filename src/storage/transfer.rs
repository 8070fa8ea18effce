//! Streaming file transfers with size and CRC32 on every file.

use std::path::Path;

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::storage::CheckpointStorage;

/// Size and checksum of a stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Size in bytes.
    pub size: u64,
    /// CRC32 (IEEE) of the content.
    pub crc32: u32,
}

/// Bytes of snapshot files this process restored (downloaded, taken from local files
/// after checking them, or linked from a copy another restore fetched) and stored
/// (uploaded), since it started: for progress displays ([`transfer_totals`]).
static RESTORED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static STORED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of snapshot files this process has restored and stored so far, over every
/// storage: `(restored, stored)`. Counted per file once it is complete and checked; a
/// progress display compares two readings.
pub fn transfer_totals() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (RESTORED.load(Relaxed), STORED.load(Relaxed))
}

/// Counts `n` restored bytes (see [`transfer_totals`]), in the process's total and in
/// `rockstate_restore_bytes_total`: a file's size once it is fetched and checked, taken
/// from the local directory after a check, or linked from a checked copy another restore
/// fetched (files a failed restore completed count too).
pub(crate) fn count_restored(n: u64) {
    RESTORED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!(crate::telemetry::RESTORE_BYTES).increment(n);
}

/// Bytes of snapshot files restores of this process read from checkpoint storage.
static FETCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of snapshot files the restores of this process have taken from checkpoint
/// storage so far (downloaded, or linked or copied from local-file storage), over every
/// storage: the part of the restored bytes of [`transfer_totals`] that was neither taken
/// from a local directory nor linked from a copy another restore of the same source
/// fetched. Counted per file once it is complete and checked (a transfer that fails
/// counts nothing).
pub fn fetched_total() -> u64 {
    FETCHED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts `n` bytes taken from checkpoint storage (see [`fetched_total`]), in the
/// process's total and in `rockstate_restore_fetched_bytes_total`.
pub(crate) fn count_fetched(n: u64) {
    FETCHED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!(crate::telemetry::RESTORE_FETCHED).increment(n);
}

fn count_stored(n: u64) {
    STORED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes read from a local file per step of a multipart upload.
const READ_CHUNK: usize = 1 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

impl CheckpointStorage {
    /// Uploads the local file `local` to the new object `rel`, returning its size and
    /// CRC32. Files up to the multipart threshold are written with create-if-absent, so an
    /// existing object is never replaced; larger files are sent in parts (memory: two
    /// parts in flight, the part being filled and a 1 MiB read buffer). Multipart uploads
    /// cannot be conditional: callers give them fresh, unique names.
    ///
    /// Errors: `AlreadyExists` when a single-part object exists; `Io` when the local file
    /// cannot be read; storage errors (`Unavailable` for retryable ones). A failed
    /// multipart upload is aborted (its parts are removed).
    pub async fn upload_file(&self, local: &Path, rel: &str) -> Result<FileInfo> {
        let info = self.upload_file_retrying(local, rel).await?;
        count_stored(info.size);
        Ok(info)
    }

    async fn upload_file_retrying(&self, local: &Path, rel: &str) -> Result<FileInfo> {
        self.retrying("upload", |attempt| async move {
            match self.upload_file_once(local, rel).await {
                // A failed attempt may have stored the object: it counts if it is ours.
                Err(e) if attempt > 0 && e.kind() == crate::error::ErrorKind::AlreadyExists => {
                    let info = local_info(local).await?;
                    match self.verify_file(rel, &info, |_| {}).await {
                        Ok(()) => Ok(info),
                        Err(_) => Err(e),
                    }
                }
                other => other,
            }
        })
        .await
    }

    async fn upload_file_once(&self, local: &Path, rel: &str) -> Result<FileInfo> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        let local_err = |e| Error::io(format!("read {}", local.display()), e);
        let mut file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let size = file.metadata().await.map_err(local_err)?.len();
        if size <= self.options.multipart_threshold {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf).await.map_err(local_err)?;
            let info = FileInfo {
                size: buf.len() as u64,
                crc32: crc32fast::hash(&buf),
            };
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            self.store
                .put_opts(&loc, PutPayload::from(buf), opts)
                .await
                .map_err(|e| Error::storage("put", self.url_of(rel), e))?;
            return Ok(info);
        }
        let upload = self
            .store
            .put_multipart(&loc)
            .await
            .map_err(|e| Error::storage("start multipart upload", self.url_of(rel), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
        let mut hasher = crc32fast::Hasher::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; READ_CHUNK];
        let streamed: Result<()> = async {
            loop {
                let n = file.read(&mut buf).await.map_err(local_err)?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                total += n as u64;
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| Error::storage("upload part", self.url_of(rel), e))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        if let Err(e) = streamed {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(path = %self.url_of(rel), error = %abort, "aborting multipart upload failed");
            }
            return Err(e);
        }
        writer
            .finish()
            .await
            .map_err(|e| Error::storage("complete multipart upload", self.url_of(rel), e))?;
        Ok(FileInfo {
            size: total,
            crc32: hasher.finalize(),
        })
    }

    /// Downloads `rel` to the new local file `local`, checking size and CRC32 against
    /// `expected` while streaming (a longer object stops early).
    ///
    /// From a local-file storage, an SST file (`local` ends with `.sst`) is hard-linked when
    /// both lie on one file system (stored files are immutable, and RocksDB never writes
    /// to an SST file; the link is then read through once for the check); other files, or
    /// where links fail, are copied in one pass that checks what it writes. The local file is not synced:
    /// restored directories are scratch space, never trusted after a crash without
    /// checking every file again.
    ///
    /// Errors: `NotFound` when the object is missing; `Corrupt`, naming the file, on a
    /// size or CRC mismatch; `Io` when the local file cannot be written. A failed download
    /// leaves a partial local file that the caller removes with its directory.
    pub async fn download_file(&self, rel: &str, local: &Path, expected: &FileInfo) -> Result<()> {
        self.download_file_once(rel, local, expected, None).await?;
        count_restored(expected.size);
        Ok(())
    }

    /// Like [`download_file`](Self::download_file); a hard link to a file that `checked`
    /// records as read through and checked already is not read again.
    ///
    /// From a store other than local files, an SST file is fetched once per `checked`
    /// (one restore source) and file system while a copy of it lasts: a later download
    /// of the same stored file, by another restore of the source, hard-links a copy
    /// fetched or linked before, if that copy is still the file that was checked (same
    /// inode, size and modification time); otherwise it is fetched again. (Copies go
    /// when their database drops them: a compaction, a rescale's base dropping files
    /// outside its range, a failed restore removing its directory.) Downloads of one
    /// stored file onto one file system take turns, so restores running side by side
    /// fetch it once too; one waiting for its turn gives up within [`CANCEL_POLL`] of
    /// `cancel` being set.
    pub(crate) async fn download_file_checked(
        &self,
        rel: &str,
        local: &Path,
        expected: &FileInfo,
        checked: Option<&std::sync::Arc<CheckedLinks>>,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<()> {
        let shared = match checked {
            Some(checked)
                if self.local_dir().is_none() && local.extension().is_some_and(|e| e == "sst") =>
            {
                device_of_parent(local)
                    .await
                    .map(|device| (checked, device))
            }
            _ => None,
        };
        let Some((checked, device)) = shared else {
            self.download_file_once(rel, local, expected, checked.cloned())
                .await?;
            count_restored(expected.size);
            return Ok(());
        };
        let url = self.url_of(rel);
        let fetched = checked.fetched(&url, device);
        let cancelled = || cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst));
        let turn = fetched.turn.lock();
        let _turn = match cancel {
            // No timer where nothing can cancel (the runtime may have none).
            None => turn.await,
            Some(_) => {
                tokio::pin!(turn);
                loop {
                    tokio::select! {
                        turn = &mut turn => break turn,
                        () = tokio::time::sleep(CANCEL_POLL) => {
                            if cancelled() {
                                return Err(Error::Internal(format!(
                                    "the fetch of {url} was cancelled"
                                )));
                            }
                        }
                    }
                }
            }
        };
        if cancelled() {
            return Err(Error::Internal(format!("the fetch of {url} was cancelled")));
        }
        let (links, target, info, copies) = (
            checked.clone(),
            local.to_path_buf(),
            *expected,
            fetched.clone(),
        );
        let linked =
            tokio::task::spawn_blocking(move || links.link_a_copy(&copies, &target, &info))
                .await
                .map_err(|e| Error::Internal(format!("link task failed: {e}")))??;
        if linked {
            count_restored(expected.size);
            return Ok(());
        }
        self.download_file_once(rel, local, expected, None).await?;
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|e| Error::io(format!("inspect {}", local.display()), e))?;
        if let Some(stamp) = FileStamp::of(&meta) {
            checked.insert(stamp, expected);
            fetched.note(local.to_path_buf());
        }
        count_restored(expected.size);
        Ok(())
    }

    async fn download_file_once(
        &self,
        rel: &str,
        local: &Path,
        expected: &FileInfo,
        checked: Option<std::sync::Arc<CheckedLinks>>,
    ) -> Result<()> {
        if let Some(source) = self.local_file(rel)? {
            self.refuse_symlinks(rel).await?;
            let (url, local, expected) = (self.url_of(rel), local.to_path_buf(), *expected);
            return tokio::task::spawn_blocking(move || {
                let link = local.extension().is_some_and(|e| e == "sst");
                let checked = checked.as_deref();
                match link_or_copy_checked(&source, &local, &expected, &url, link, checked)? {
                    true => {
                        count_fetched(expected.size);
                        Ok(())
                    }
                    false => Err(Error::NotFound(format!("{url} (get)"))),
                }
            })
            .await
            .map_err(|e| Error::Internal(format!("download task failed: {e}")))?;
        }
        let mut read = CheckedRead::open(self, rel, expected).await?;
        let local_err = |e| Error::io(format!("write {}", local.display()), e);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(local)
            .await
            .map_err(local_err)?;
        // Small chunks are gathered: every write of a tokio file is a blocking task.
        let mut gathered = Vec::with_capacity(READ_CHUNK);
        while let Some(chunk) = read.next().await? {
            if gathered.is_empty() && chunk.len() >= READ_CHUNK {
                file.write_all(&chunk).await.map_err(local_err)?;
                continue;
            }
            gathered.extend_from_slice(&chunk);
            if gathered.len() >= READ_CHUNK {
                file.write_all(&gathered).await.map_err(local_err)?;
                gathered.clear();
            }
        }
        file.write_all(&gathered).await.map_err(local_err)?;
        file.flush().await.map_err(local_err)?;
        read.finish()?;
        count_fetched(expected.size);
        Ok(())
    }

    /// The local path of `rel` in a local-file storage (`None` for other stores).
    fn local_file(&self, rel: &str) -> Result<Option<std::path::PathBuf>> {
        self.location(rel)?;
        Ok(self.local_dir().map(|root| {
            let mut path = root.to_path_buf();
            path.extend(rel.split('/').filter(|s| !s.is_empty()));
            path
        }))
    }

    /// Reads `rel` through and checks its size and CRC32 against `expected`, without
    /// keeping it; `on_bytes` is called with the length of every chunk read.
    ///
    /// Errors: `NotFound` when the object is missing; `Corrupt`, naming the file, on a
    /// size or CRC mismatch; storage errors.
    pub async fn verify_file(
        &self,
        rel: &str,
        expected: &FileInfo,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<()> {
        let mut read = CheckedRead::open(self, rel, expected).await?;
        while let Some(chunk) = read.next().await? {
            on_bytes(chunk.len() as u64);
        }
        read.finish()
    }
}

/// Puts a verified copy of the local file `source` at the new path `target`: a hard link
/// when `link` and possible, else a copy. Returns `false` when `source` does not exist.
///
/// The bytes checked are the bytes kept: a link is read through after it is made (the
/// same inode), a copy is checked while it is written. A link whose inode `checked`
/// records as read through already, with the same size, modification time and recorded
/// CRC32, is not read again (the bytes are the ones checked); every link that is read
/// through and passes is recorded there.
///
/// Errors: `Corrupt`, naming `url`, when size or CRC32 differ from `expected` (the target
/// may be left behind for the caller to remove); `AlreadyExists` when `target` exists;
/// `Io` otherwise.
pub(crate) fn link_or_copy_checked(
    source: &Path,
    target: &Path,
    expected: &FileInfo,
    url: &str,
    link: bool,
    checked: Option<&CheckedLinks>,
) -> Result<bool> {
    let read_err = |e| Error::io(format!("read {}", source.display()), e);
    let size = match std::fs::metadata(source) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(read_err(e)),
    };
    if size != expected.size {
        return Err(Error::corrupt(
            format!("file {url}"),
            format!("size {size} but {} recorded", expected.size),
        ));
    }
    let linked = match link.then(|| std::fs::hard_link(source, target)) {
        None => false,
        Some(Ok(())) => true,
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists(format!("file {}", target.display())))
        }
        // Another file system, or links not allowed: copy.
        Some(Err(_)) => false,
    };
    let mut input = std::fs::File::open(if linked { target } else { source }).map_err(read_err)?;
    // Taken before reading: a change while the file is read gives it another stamp.
    let stamp = match (linked, checked) {
        (true, Some(checked)) => {
            let stamp = input.metadata().ok().and_then(|m| FileStamp::of(&m));
            if stamp.is_some_and(|s| checked.contains(s, expected)) {
                return Ok(true);
            }
            stamp
        }
        _ => None,
    };
    let mut output = if linked {
        None
    } else {
        Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(|e| Error::io(format!("write {}", target.display()), e))?,
        )
    };
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = std::io::Read::read(&mut input, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > expected.size {
            return Err(Error::corrupt(
                format!("file {url}"),
                format!("longer than the {} bytes recorded", expected.size),
            ));
        }
        hasher.update(&buf[..n]);
        if let Some(out) = output.as_mut() {
            std::io::Write::write_all(out, &buf[..n])
                .map_err(|e| Error::io(format!("write {}", target.display()), e))?;
        }
    }
    check_read(url, expected, total, hasher.finalize())?;
    if let (Some(stamp), Some(checked)) = (stamp, checked) {
        checked.insert(stamp, expected);
    }
    Ok(true)
}

/// The identity and state of a local file: device, inode, size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileStamp {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
}

impl FileStamp {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<Self> {
        None
    }
}

/// How often a download waiting for its turn at a stored file checks whether its
/// restore was cancelled.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Copies of one stored file kept track of per file system, the newest first.
const COPIES_KEPT: usize = 4;

/// The copies a restore source's restores made of one stored file on one file system
/// (see [`CheckpointStorage::download_file_checked`]).
#[derive(Default)]
struct Fetched {
    /// Held while the file is fetched or linked.
    turn: tokio::sync::Mutex<()>,
    /// Where copies were put, the newest first (at most [`COPIES_KEPT`]); each is
    /// checked again before it is linked. Never locked across an await.
    copies: parking_lot::Mutex<Vec<std::path::PathBuf>>,
}

impl Fetched {
    fn note(&self, copy: std::path::PathBuf) {
        let mut copies = self.copies.lock();
        copies.retain(|c| c != &copy);
        copies.insert(0, copy);
        copies.truncate(COPIES_KEPT);
    }
}

/// Local files one restore source's restores have read through and checked, by inode.
/// A rescale links a stored file into each new subtask that shares its key groups; the
/// hard links share one inode, so its bytes are read and checked once per restore source
/// rather than once per link. From other stores, where the source's restores put the
/// stored SST files they fetched, by URL and file system, so that its other restores
/// link such a copy instead of fetching the file again. Bounded by the number of files
/// of the snapshot fetched (a file fetched again adds one record).
#[derive(Default)]
pub(crate) struct CheckedLinks {
    files: parking_lot::Mutex<std::collections::HashMap<FileStamp, FileInfo>>,
    fetched: parking_lot::Mutex<std::collections::HashMap<(String, u64), std::sync::Arc<Fetched>>>,
}

impl std::fmt::Debug for CheckedLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedLinks")
            .field("files", &self.files.lock().len())
            .field("fetched", &self.fetched.lock().len())
            .finish()
    }
}

impl CheckedLinks {
    fn contains(&self, stamp: FileStamp, expected: &FileInfo) -> bool {
        self.files.lock().get(&stamp) == Some(expected)
    }

    fn insert(&self, stamp: FileStamp, expected: &FileInfo) {
        self.files.lock().insert(stamp, *expected);
    }

    fn fetched(&self, url: &str, device: u64) -> std::sync::Arc<Fetched> {
        self.fetched
            .lock()
            .entry((url.to_string(), device))
            .or_default()
            .clone()
    }

    /// Hard-links to `target` the newest copy in `fetched` that is still the file
    /// fetched and checked (its inode, size and modification time recorded with
    /// `expected`), and notes `target` as a copy too; copies that are gone or are other
    /// files now are forgotten. `false` when none is left (or none can be linked): the
    /// caller fetches the file. Copies a concurrent [`relocate`](Self::relocate) moved
    /// while they were tried are tried once more where they are now.
    ///
    /// Errors: `AlreadyExists` when `target` exists; `Io` when a link made in vain cannot
    /// be removed.
    fn link_a_copy(&self, fetched: &Fetched, target: &Path, expected: &FileInfo) -> Result<bool> {
        let mut tried = std::collections::HashSet::new();
        for _ in 0..2 {
            let copies: Vec<_> = fetched.copies.lock().clone();
            for at in copies {
                if !tried.insert(at.clone()) {
                    continue;
                }
                match self.link_copy(&at, target, expected)? {
                    Linked::Yes => {
                        fetched.note(target.to_path_buf());
                        return Ok(true);
                    }
                    Linked::CopyGone => fetched.copies.lock().retain(|c| c != &at),
                    // The copy may serve another target (a link across file systems,
                    // a directory that refuses links): kept.
                    Linked::NotHere => {}
                }
            }
        }
        Ok(false)
    }

    /// [`link_a_copy`](Self::link_a_copy) for the one copy `at`.
    fn link_copy(&self, at: &Path, target: &Path, expected: &FileInfo) -> Result<Linked> {
        match std::fs::hard_link(at, target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(format!("file {}", target.display())))
            }
            Err(_) => {
                return Ok(match std::fs::symlink_metadata(at) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Linked::CopyGone,
                    _ => Linked::NotHere,
                })
            }
        }
        // The link's own inode: whatever `at` names by now, `target` is this file.
        let same = std::fs::symlink_metadata(target)
            .ok()
            .and_then(|m| FileStamp::of(&m))
            .is_some_and(|stamp| self.contains(stamp, expected));
        if same {
            return Ok(Linked::Yes);
        }
        std::fs::remove_file(target)
            .map_err(|e| Error::io(format!("remove {}", target.display()), e))?;
        // `at` names another file now (or one changed since it was checked).
        Ok(Linked::CopyGone)
    }

    /// Copies in the directory `from` that `to` holds as well (hard links, as an
    /// ingestion leaves them, under other names) are linked from `to` from now on; the
    /// others in `from` are forgotten. Called before `from` is removed; blocking (the
    /// files are looked at outside the locks that downloads take).
    pub(crate) fn relocate(&self, from: &Path, to: &Path) {
        let all: Vec<std::sync::Arc<Fetched>> = self.fetched.lock().values().cloned().collect();
        let mut held: Option<std::collections::HashMap<(u64, u64), std::path::PathBuf>> = None;
        for fetched in all {
            let inside: Vec<std::path::PathBuf> = fetched
                .copies
                .lock()
                .iter()
                .filter(|c| c.starts_with(from))
                .cloned()
                .collect();
            if inside.is_empty() {
                continue;
            }
            let held = held.get_or_insert_with(|| inodes_in(to));
            let moved: Vec<(std::path::PathBuf, Option<std::path::PathBuf>)> = inside
                .into_iter()
                .map(|c| {
                    let now = std::fs::symlink_metadata(&c)
                        .ok()
                        .and_then(|m| FileStamp::of(&m))
                        .and_then(|s| held.get(&(s.device, s.inode)).cloned());
                    (c, now)
                })
                .collect();
            let mut copies = fetched.copies.lock();
            let mut kept: Vec<std::path::PathBuf> = Vec::with_capacity(copies.len());
            for copy in copies.drain(..) {
                let copy = match moved.iter().find(|(c, _)| c == &copy) {
                    Some((_, now)) => match now {
                        Some(now) => now.clone(),
                        None => continue,
                    },
                    None => copy,
                };
                if !kept.contains(&copy) {
                    kept.push(copy);
                }
            }
            *copies = kept;
        }
    }
}

/// What became of an attempt to link a copy of a fetched file.
enum Linked {
    /// The target is the checked file.
    Yes,
    /// The copy is gone, or is another file now: forget it.
    CopyGone,
    /// It could not be linked to this target (another file system, say).
    NotHere,
}

/// The device of the directory `path` lies in (`None` where there is no such notion, or
/// it cannot be read).
async fn device_of_parent(path: &Path) -> Option<u64> {
    let meta = tokio::fs::metadata(path.parent()?).await.ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(meta.dev())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// The SST files directly in `dir`, by device and inode (empty when it cannot be read).
fn inodes_in(dir: &Path) -> std::collections::HashMap<(u64, u64), std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .filter_map(|p| {
            let stamp = FileStamp::of(&std::fs::symlink_metadata(&p).ok()?)?;
            Some(((stamp.device, stamp.inode), p))
        })
        .collect()
}

/// Compares what was read with what was recorded.
pub(crate) fn check_read(url: &str, expected: &FileInfo, total: u64, crc: u32) -> Result<()> {
    if total != expected.size {
        return Err(Error::corrupt(
            format!("file {url}"),
            format!("{total} bytes read but {} recorded", expected.size),
        ));
    }
    if crc != expected.crc32 {
        return Err(Error::corrupt(
            format!("file {url}"),
            format!(
                "CRC32 mismatch: {crc:08x} read, {:08x} recorded",
                expected.crc32
            ),
        ));
    }
    Ok(())
}

/// Size and CRC32 of a local file.
async fn local_info(local: &Path) -> Result<FileInfo> {
    let local_err = |e| Error::io(format!("read {}", local.display()), e);
    let mut file = tokio::fs::File::open(local).await.map_err(local_err)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(local_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileInfo {
        size,
        crc32: hasher.finalize(),
    })
}

/// A streaming read of one object checked against its recorded size and CRC32.
struct CheckedRead {
    url: String,
    expected: FileInfo,
    stream: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    hasher: crc32fast::Hasher,
    total: u64,
}

impl CheckedRead {
    /// Starts the read; fails at once when the stored size differs from the recorded one.
    async fn open(storage: &CheckpointStorage, rel: &str, expected: &FileInfo) -> Result<Self> {
        let loc = storage.location(rel)?;
        storage.refuse_symlinks(rel).await?;
        let url = storage.url_of(rel);
        let result = storage
            .store
            .get(&loc)
            .await
            .map_err(|e| Error::storage("get", &url, e))?;
        if result.meta.size != expected.size {
            return Err(Error::corrupt(
                format!("file {url}"),
                format!("size {} but {} recorded", result.meta.size, expected.size),
            ));
        }
        Ok(Self {
            url,
            expected: *expected,
            stream: result.into_stream(),
            hasher: crc32fast::Hasher::new(),
            total: 0,
        })
    }

    /// The next chunk, `None` at the end. Stops as soon as the object is longer than
    /// recorded.
    async fn next(&mut self) -> Result<Option<bytes::Bytes>> {
        let Some(chunk) = self.stream.next().await else {
            return Ok(None);
        };
        let chunk = chunk.map_err(|e| Error::storage("read", &self.url, e))?;
        self.total += chunk.len() as u64;
        if self.total > self.expected.size {
            return Err(Error::corrupt(
                format!("file {}", self.url),
                format!("longer than the {} bytes recorded", self.expected.size),
            ));
        }
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }

    /// Checks the length and checksum of everything read.
    fn finish(self) -> Result<()> {
        check_read(
            &self.url,
            &self.expected,
            self.total,
            self.hasher.finalize(),
        )
    }
}
/// Removes `path` (a file, a link, or a directory tree; links are not followed); a
/// missing path is fine.
pub(crate) fn remove_local(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspect {}", path.display()), e)),
    };
    let removed = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(|e| Error::io(format!("remove {}", path.display()), e))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn info(bytes: &[u8]) -> FileInfo {
        FileInfo {
            size: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }

    /// Overwrites `path` in place with `bytes` of the same length and puts its
    /// modification time back.
    fn damage_keeping_mtime(path: &Path, bytes: &[u8]) {
        let modified = std::fs::metadata(path).unwrap().modified().unwrap();
        std::fs::write(path, bytes).unwrap();
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(modified).unwrap();
    }

    #[test]
    fn a_checked_inode_is_read_once_per_record_and_again_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let stored = dir.path().join("stored.sst");
        let good = b"the bytes of a stored file".to_vec();
        std::fs::write(&stored, &good).unwrap();
        let expected = info(&good);
        let checked = CheckedLinks::default();
        let link = |name: &str, checked: Option<&CheckedLinks>| {
            link_or_copy_checked(
                &stored,
                &dir.path().join(name),
                &expected,
                "u",
                true,
                checked,
            )
        };
        assert!(link("a.sst", Some(&checked)).unwrap());

        // The same inode with unchanged size and time is not read again: damage that
        // keeps both goes unseen by a second link through the same record...
        let mut bad = good.clone();
        bad[0] ^= 1;
        damage_keeping_mtime(&stored, &bad);
        assert!(link("b.sst", Some(&checked)).unwrap());
        // ...but not by a link without the record, nor through a fresh record.
        assert!(matches!(link("c.sst", None), Err(Error::Corrupt { .. })));
        let fresh = CheckedLinks::default();
        assert!(matches!(
            link("d.sst", Some(&fresh)),
            Err(Error::Corrupt { .. })
        ));

        // A write that changes the modification time is read again.
        let changed = std::time::SystemTime::now() + std::time::Duration::from_secs(3);
        std::fs::write(&stored, &bad).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&stored)
            .unwrap()
            .set_modified(changed)
            .unwrap();
        assert!(matches!(
            link("e.sst", Some(&checked)),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn a_record_never_vouches_for_another_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let stored = dir.path().join("stored.sst");
        std::fs::write(&stored, b"content").unwrap();
        let checked = CheckedLinks::default();
        let right = info(b"content");
        let target = |n: &str| dir.path().join(n);
        assert!(
            link_or_copy_checked(&stored, &target("a.sst"), &right, "u", true, Some(&checked))
                .unwrap()
        );
        let wrong = FileInfo {
            crc32: right.crc32 ^ 1,
            ..right
        };
        assert!(matches!(
            link_or_copy_checked(&stored, &target("b.sst"), &wrong, "u", true, Some(&checked)),
            Err(Error::Corrupt { .. })
        ));
        // Copies are always checked while written, whatever the record says.
        assert!(
            link_or_copy_checked(&stored, &target("c"), &right, "u", false, Some(&checked))
                .unwrap()
        );
        assert_eq!(std::fs::read(target("c")).unwrap(), b"content");
    }

    /// Records `path` as a fetched and checked copy of `bytes` in `checked`.
    fn fetched_copy(checked: &CheckedLinks, fetched: &Fetched, path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(path).unwrap()).unwrap();
        checked.insert(stamp, &info(bytes));
        fetched.note(path.to_path_buf());
    }

    #[test]
    fn a_fetched_copy_is_linked_only_while_it_is_the_file_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let bytes = b"the bytes of a fetched file".to_vec();
        let checked = CheckedLinks::default();
        let fetched = Fetched::default();
        fetched_copy(&checked, &fetched, &path("first.sst"), &bytes);
        // Linked, and the link noted as a copy too, the newest first.
        assert!(checked
            .link_a_copy(&fetched, &path("second.sst"), &info(&bytes))
            .unwrap());
        assert_eq!(std::fs::read(path("second.sst")).unwrap(), bytes);
        assert_eq!(
            *fetched.copies.lock(),
            vec![path("second.sst"), path("first.sst")]
        );
        // An existing target is refused.
        assert!(matches!(
            checked.link_a_copy(&fetched, &path("first.sst"), &info(&bytes)),
            Err(Error::AlreadyExists(_))
        ));
        // A target that cannot be linked (here: its directory is missing) is not
        // linked, and the copies are kept for other targets.
        assert!(!checked
            .link_a_copy(&fetched, &path("missing/x.sst"), &info(&bytes))
            .unwrap());
        assert_eq!(fetched.copies.lock().len(), 2);
        // The newest copy overwritten in place (same inode, a new modification time),
        // the other one removed: neither is linked, the target is left absent and both
        // are forgotten.
        let later = std::fs::metadata(path("second.sst"))
            .unwrap()
            .modified()
            .unwrap()
            + std::time::Duration::from_secs(5);
        let mut damaged = bytes.clone();
        damaged[0] ^= 1;
        std::fs::write(path("second.sst"), &damaged).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path("second.sst"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        std::fs::remove_file(path("first.sst")).unwrap();
        assert!(!checked
            .link_a_copy(&fetched, &path("third.sst"), &info(&bytes))
            .unwrap());
        assert!(!path("third.sst").exists());
        assert!(fetched.copies.lock().is_empty());
    }

    #[test]
    fn copies_in_a_removed_directory_are_found_where_it_linked_them() {
        let root = tempfile::tempdir().unwrap();
        let (staging, db) = (root.path().join("staging"), root.path().join("db"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let checked = CheckedLinks::default();
        let (kept, dropped) = (checked.fetched("s://a", 1), checked.fetched("s://b", 1));
        fetched_copy(&checked, &kept, &staging.join("a.sst"), b"a");
        fetched_copy(&checked, &dropped, &staging.join("b.sst"), b"b");
        // Only `a` was ingested: linked into the database under another name.
        std::fs::hard_link(staging.join("a.sst"), db.join("000042.sst")).unwrap();
        checked.relocate(&staging, &db);
        std::fs::remove_dir_all(&staging).unwrap();
        assert_eq!(*kept.copies.lock(), vec![db.join("000042.sst")]);
        assert!(dropped.copies.lock().is_empty());
        assert!(checked
            .link_a_copy(&kept, &root.path().join("c.sst"), &info(b"a"))
            .unwrap());
    }

    /// Downloads of one stored file by restores of one source take turns: a second one
    /// waits for the first one's fetch and links its copy (one GET in all), and one whose
    /// restore is cancelled while it waits gives up without waiting for the fetch.
    #[cfg(feature = "testing")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn downloads_of_one_file_take_turns_and_a_cancelled_one_stops_waiting() {
        use crate::testing::{GatedStore, Match, Op};
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(object_store::memory::InMemory::new());
        let bytes = b"the bytes of a stored SST file".to_vec();
        memory
            .put(&"f.sst".into(), PutPayload::from(bytes.clone()))
            .await
            .unwrap();
        let gated = Arc::new(GatedStore::new(memory));
        let storage = CheckpointStorage::from_store(gated.clone(), "gated://turns");
        let checked = Arc::new(CheckedLinks::default());
        let expected = info(&bytes);
        let gate = gated.gate(Match::op(Op::Get).path_is("f.sst"));
        let download = |name: &str, cancel: Option<Arc<AtomicBool>>| {
            let (storage, checked) = (storage.clone(), checked.clone());
            let target = dir.path().join(name);
            tokio::spawn(async move {
                storage
                    .download_file_checked(
                        "f.sst",
                        &target,
                        &expected,
                        Some(&checked),
                        cancel.as_deref(),
                    )
                    .await
            })
        };
        let first = download("first.sst", None);
        assert_eq!(gate.wait_arrived().await, "f.sst");
        // The first fetch is held: a download waits for its turn, and stops once its
        // restore is cancelled.
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = download("cancelled.sst", Some(cancel.clone()));
        tokio::time::sleep(CANCEL_POLL * 4).await;
        assert!(!cancelled.is_finished(), "it did not wait for its turn");
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), cancelled)
            .await
            .expect("a cancelled download waited for another's fetch")
            .unwrap();
        assert!(stopped.unwrap_err().to_string().contains("cancelled"));
        // A second download waits for the held fetch, then links its copy.
        let second = download("second.sst", Some(Arc::new(AtomicBool::new(false))));
        assert_eq!(gate.release().as_deref(), Some("f.sst"));
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(std::fs::read(dir.path().join("second.sst")).unwrap(), bytes);
        let gets = gated
            .requests()
            .into_iter()
            .filter(|r| r.op == Op::Get)
            .count();
        assert_eq!(gets, 1);
        assert!(!dir.path().join("cancelled.sst").exists());
    }
}
