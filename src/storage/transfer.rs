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
        let loc = self.location(rel)?;
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
    /// `expected` while streaming (a longer object stops early), and syncs the file to
    /// disk.
    ///
    /// Errors: `NotFound` when the object is missing; `Corrupt`, naming the file, on a
    /// size or CRC mismatch; `Io` when the local file cannot be written. A failed download
    /// leaves a partial local file that the caller removes with its directory.
    pub async fn download_file(&self, rel: &str, local: &Path, expected: &FileInfo) -> Result<()> {
        let loc = self.location(rel)?;
        let url = self.url_of(rel);
        let result = self
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
        let local_err = |e| Error::io(format!("write {}", local.display()), e);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(local)
            .await
            .map_err(local_err)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut total = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::storage("read", &url, e))?;
            total += chunk.len() as u64;
            if total > expected.size {
                return Err(Error::corrupt(
                    format!("file {url}"),
                    format!("longer than the {} bytes recorded", expected.size),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(local_err)?;
        }
        file.flush().await.map_err(local_err)?;
        file.sync_all().await.map_err(local_err)?;
        if total != expected.size {
            return Err(Error::corrupt(
                format!("file {url}"),
                format!("{total} bytes read but {} recorded", expected.size),
            ));
        }
        let crc = hasher.finalize();
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
}
