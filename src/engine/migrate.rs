//! Rewrites every stored value of a state through a conversion, all or nothing: the
//! converted entries go to SST files beside the database, and are ingested in one step
//! only once every value has converted. A failure leaves the state as it was.

use std::path::{Path, PathBuf};

use rocksdb::{IngestExternalFileOptions, SstFileWriter};

use crate::engine::ttl;
use crate::engine::{BackendCore, ColumnSettings};
use crate::error::{Error, Result};
use crate::format::StateKind;

/// Bytes of converted entries after which a new SST file is started.
const FILE_TARGET: u64 = 64 << 20;

/// Converts the payload of one stored value (without its TTL framing).
pub(crate) type Convert<'a> = &'a (dyn Fn(&[u8]) -> Result<Vec<u8>> + Send + Sync);

/// Removes the rewrite's folder whatever happens.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the folder of a state migration");
            }
        }
    }
}

impl BackendCore {
    /// Converts every value of `column` (of `kind`, TTL-framed when `ttl`) with `convert`,
    /// keeping keys and write times. Returns the number of values converted.
    ///
    /// Errors: the first conversion error, naming the entry; engine and I/O errors. On
    /// error nothing was changed.
    pub(crate) fn rewrite_values(
        &self,
        column: &ColumnSettings,
        kind: StateKind,
        ttl: bool,
        convert: Convert<'_>,
    ) -> Result<u64> {
        let dir = self
            .dir()
            .join(format!("migrate-{}", crate::engine::new_uid()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let scratch = Scratch(dir);
        let what = || format!("state column {:?}", column.cf_name);
        let opts = rocksdb::Options::default();
        let mut files = Vec::new();
        let mut writer: Option<SstFileWriter<'_>> = None;
        let mut in_file = 0u64;
        let mut converted = 0u64;
        let mut scan = self.scan(column, Vec::new(), None)?;
        let mut out = Vec::new();
        while let Some((key, raw)) = scan.current()? {
            out.clear();
            if kind == StateKind::List {
                for element in ttl::Elements::new(raw, ttl) {
                    let element = element.map_err(|e| Error::corrupt(what(), e))?;
                    let payload = convert(element.payload).map_err(|e| in_entry(e, key))?;
                    ttl::frame_element(
                        &mut out,
                        ttl.then_some(0),
                        element.written.unwrap_or(0),
                        &payload,
                    )?;
                }
            } else {
                let (written, payload) = ttl::split_value(raw, ttl, &what)?;
                let payload = convert(payload).map_err(|e| in_entry(e, key))?;
                if let Some(ts) = written {
                    out.extend_from_slice(&ts.to_be_bytes());
                }
                out.extend_from_slice(&payload);
            }
            if writer.is_none() || in_file >= FILE_TARGET {
                if let Some(w) = writer.take() {
                    finish(w, files.last().map(PathBuf::as_path))?;
                }
                let path = scratch.0.join(format!("{:06}.sst", files.len()));
                let mut w = SstFileWriter::create(&opts);
                w.open(&path)
                    .map_err(|e| Error::engine(format!("open {}", path.display()), e))?;
                files.push(path);
                writer = Some(w);
                in_file = 0;
            }
            if let Some(w) = writer.as_mut() {
                w.put(key, &out)
                    .map_err(|e| Error::engine("write a migrated entry", e))?;
            }
            in_file += (key.len() + out.len()) as u64;
            converted += 1;
            scan.advance();
        }
        drop(scan);
        if let Some(w) = writer.take() {
            finish(w, files.last().map(PathBuf::as_path))?;
        }
        if files.is_empty() {
            return Ok(0);
        }
        let cf = self.column_cf(column)?;
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        self.layout_changed()?;
        self.db
            .ingest_external_file_cf_opts(&cf, &ingest, files)
            .map_err(|e| Error::engine(format!("ingest the migrated values of {}", what()), e))
            // Also after a failure, which may come after the files went in.
            .and(self.apply_and_forget())?;
        Ok(converted)
    }
}

fn finish(mut writer: SstFileWriter<'_>, path: Option<&Path>) -> Result<()> {
    writer.finish().map_err(|e| {
        Error::engine(
            format!(
                "finish {}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            ),
            e,
        )
    })
}

fn in_entry(e: Error, key: &[u8]) -> Error {
    let shown: String = key.iter().take(32).map(|b| format!("{b:02x}")).collect();
    match e {
        Error::Corrupt { what, detail } => Error::Corrupt {
            what: format!("{what} (entry with key {shown})"),
            detail,
        },
        other => other,
    }
}
