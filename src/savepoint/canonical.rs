//! The canonical savepoint data file: one per subtask, independent of RocksDB's formats.
//!
//! ```text
//! header   magic "RKSTSAVP" | u32 version | u32 length | payload (FileHeader) | u32 CRC32
//! sections one per key group of the range, in order; each is zero or more blocks:
//!          u8 compression | u32 stored length | u32 raw length | stored bytes | u32 CRC32
//!          (the CRC covers the block's first 9 bytes and its stored bytes)
//! index    payload (Vec<Section>: offset, length, entries per key group)
//! footer   u64 index offset | u32 index length | u32 index CRC32 | magic "RKSTSEND"
//! ```
//!
//! All integers are big-endian. A block holds whole entries: u16 state index, u32 key
//! length, key (the RocksDB key without its key-group prefix), u32 value length, value
//! (the stored value, TTL timestamp included). Blocks are cut at about 256 KiB of entries,
//! so writing and reading use bounded memory whatever the state size. A reader reads the
//! footer and index, then only the sections of the key groups it needs.

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::engine::BackendCore;
use crate::error::{Error, Result};
use crate::format::{Compression, StateMeta};
use crate::keygroup::{self, KeyGroupRange};
use crate::storage::{CheckpointStorage, FileInfo};

/// First bytes of a canonical savepoint data file.
pub const DATA_MAGIC: &[u8; 8] = b"RKSTSAVP";
/// Last bytes of a canonical savepoint data file.
pub const END_MAGIC: &[u8; 8] = b"RKSTSEND";
/// The data file format version this build writes and reads.
/// Version 2 records the structure of the states' types in the header.
pub const DATA_VERSION: u32 = 2;

/// Raw bytes of entries after which a block is closed.
const BLOCK_TARGET: usize = 256 << 10;
/// Largest raw block accepted by a reader (a block holds at least one entry, and one
/// entry can exceed the target).
const MAX_BLOCK_RAW: u64 = 1 << 30;
/// Largest header or index accepted.
const MAX_META_LEN: u64 = 64 << 20;
const BLOCK_HEADER_LEN: usize = 1 + 4 + 4;
const FOOTER_LEN: u64 = 8 + 4 + 4 + 8;
/// Bytes read from storage at once while reading a section.
const READ_WINDOW: u64 = 4 << 20;

/// The header of a data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// The savepoint's id.
    pub checkpoint_id: u64,
    /// Number of key groups of the job.
    pub max_parallelism: u32,
    /// Key groups in this file, one section each.
    pub key_group_range: KeyGroupRange,
    /// The states; entries name them by index into this list.
    pub states: Vec<StateMeta>,
    /// How blocks are compressed when written (each block records its own).
    pub compression: Compression,
}

/// Where one key group's section lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Offset of the section's first block.
    pub offset: u64,
    /// Length of the section in bytes.
    pub len: u64,
    /// Number of entries.
    pub entries: u64,
}

/// What writing a data file produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub info: FileInfo,
    pub entries: u64,
    pub raw_bytes: u64,
}

/// A writer that counts and checksums everything written through it.
struct Tracked<W: Write> {
    inner: W,
    hasher: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Tracked<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn framed(magic: &[u8; 8], payload: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| u64::from(*l) <= MAX_META_LEN)
        .ok_or_else(|| Error::invalid("savepoint header too large"))?;
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(magic);
    out.extend_from_slice(&DATA_VERSION.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

fn encode_block(compression: Compression, raw: &[u8]) -> Vec<u8> {
    let stored: std::borrow::Cow<'_, [u8]> = match compression {
        Compression::None => raw.into(),
        Compression::Lz4 => lz4_flex::block::compress(raw).into(),
    };
    // Incompressible data is stored as is.
    let (tag, stored) = if stored.len() >= raw.len() {
        (Compression::None.tag(), std::borrow::Cow::Borrowed(raw))
    } else {
        (compression.tag(), stored)
    };
    let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + stored.len() + 4);
    out.push(tag);
    out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    out.extend_from_slice(&stored);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Writes the canonical data file of the backend `core` (a consistent, private copy) to
/// the new local file `path`, streaming state by state and key group by key group.
pub(crate) fn write_file(
    core: &BackendCore,
    checkpoint_id: u64,
    compression: Compression,
    path: &Path,
) -> Result<Written> {
    let io = |e| Error::io(format!("write {}", path.display()), e);
    let range = core.key_group_range();
    let columns = core.state_columns();
    let header = FileHeader {
        checkpoint_id,
        max_parallelism: core.max_parallelism(),
        key_group_range: range,
        states: columns.iter().map(|(m, _)| m.clone()).collect(),
        compression,
    };
    if header.states.len() > usize::from(u16::MAX) {
        return Err(Error::invalid("more than 65535 states in one backend"));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    let mut out = Tracked {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
        written: 0,
    };
    out.put(&framed(DATA_MAGIC, &codec::encode_key(&header)?)?)
        .map_err(io)?;
    let mut sections = Vec::with_capacity(range.len() as usize);
    let mut block = Vec::with_capacity(BLOCK_TARGET + 4096);
    let mut total_entries = 0u64;
    let mut raw_bytes = 0u64;
    let now = core.now_millis();
    for kg in range.iter() {
        let offset = out.written;
        let mut entries = 0u64;
        let lower = codec::key_group_prefix(kg).to_vec();
        let upper = codec::prefix_successor(&lower);
        for (index, (meta, column)) in columns.iter().enumerate() {
            let mut scan = core.scan(column, lower.clone(), upper.clone())?;
            while let Some((key, value)) = scan.current()? {
                // Expired values (and list elements) stay behind: a savepoint holds what
                // reads would see.
                let value: std::borrow::Cow<'_, [u8]> = match meta.ttl_millis {
                    None => value.into(),
                    Some(ttl_ms) => {
                        match crate::engine::ttl::live_part(meta.kind, value, ttl_ms, now)
                            .map_err(|e| Error::corrupt(format!("state {:?}", meta.name), e))?
                        {
                            Some(live) => live,
                            None => {
                                scan.advance();
                                continue;
                            }
                        }
                    }
                };
                let value = value.as_ref();
                // Every key of the scanned range starts with its 2-byte key group.
                let key = key.get(2..).unwrap_or_default();
                let key_len = u32::try_from(key.len())
                    .map_err(|_| Error::invalid("a key longer than 4 GiB"))?;
                let value_len = u32::try_from(value.len())
                    .map_err(|_| Error::invalid("a value longer than 4 GiB"))?;
                block.extend_from_slice(&(index as u16).to_be_bytes());
                block.extend_from_slice(&key_len.to_be_bytes());
                block.extend_from_slice(key);
                block.extend_from_slice(&value_len.to_be_bytes());
                block.extend_from_slice(value);
                entries += 1;
                if block.len() >= BLOCK_TARGET {
                    raw_bytes += block.len() as u64;
                    out.put(&encode_block(compression, &block)).map_err(io)?;
                    block.clear();
                }
                scan.advance();
            }
        }
        if !block.is_empty() {
            raw_bytes += block.len() as u64;
            out.put(&encode_block(compression, &block)).map_err(io)?;
            block.clear();
        }
        total_entries += entries;
        sections.push(Section {
            offset,
            len: out.written - offset,
            entries,
        });
    }
    let index = codec::encode_key(&sections)?;
    let index_len =
        u32::try_from(index.len()).map_err(|_| Error::invalid("savepoint index too large"))?;
    let index_offset = out.written;
    out.put(&index).map_err(io)?;
    let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
    footer.extend_from_slice(&index_offset.to_be_bytes());
    footer.extend_from_slice(&index_len.to_be_bytes());
    footer.extend_from_slice(&crc32fast::hash(&index).to_be_bytes());
    footer.extend_from_slice(END_MAGIC);
    out.put(&footer).map_err(io)?;
    let Tracked {
        inner,
        hasher,
        written,
    } = out;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(Written {
        info: FileInfo {
            size: written,
            crc32: hasher.finalize(),
        },
        entries: total_entries,
        raw_bytes,
    })
}

/// One entry read from a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Index of the state in the header's list.
    pub state: u16,
    /// The key group.
    pub key_group: u16,
    /// The RocksDB key without its key-group prefix.
    pub key: &'a [u8],
    /// The stored value.
    pub value: &'a [u8],
}

/// Reads a canonical data file from storage, one key group at a time.
#[derive(Debug, Clone)]
pub struct DataFileReader {
    storage: CheckpointStorage,
    path: String,
    header: FileHeader,
    sections: Vec<Section>,
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

impl DataFileReader {
    /// Opens the data file `path` of `storage`: reads and checks the footer, the index and
    /// the header. `expected_size` is the size recorded in the savepoint's metadata.
    ///
    /// Errors: `NotFound` when the file is missing; `Corrupt` naming the file for a
    /// truncated file, bad magic, CRC mismatch or inconsistent index; `Incompatible` for
    /// an unknown format version.
    pub async fn open(storage: &CheckpointStorage, path: &str, expected_size: u64) -> Result<Self> {
        let what = format!("savepoint file {}", storage.url_of(path));
        let corrupt = |detail: String| Error::corrupt(&what, detail);
        let size = storage.size_of(path).await?;
        if size != expected_size {
            return Err(corrupt(format!(
                "{size} bytes, {expected_size} recorded (truncated or replaced?)"
            )));
        }
        if size < FOOTER_LEN + 20 {
            return Err(corrupt(format!("{size} bytes, too short")));
        }
        let footer = storage.read_range(path, size - FOOTER_LEN..size).await?;
        if &footer[16..24] != END_MAGIC {
            return Err(corrupt(
                "bad end magic (truncated or not a savepoint file)".into(),
            ));
        }
        let index_offset = be_u64(&footer[0..8]);
        let index_len = u64::from(be_u32(&footer[8..12]));
        let index_crc = be_u32(&footer[12..16]);
        if index_len > MAX_META_LEN
            || index_offset.checked_add(index_len) != Some(size - FOOTER_LEN)
        {
            return Err(corrupt("the footer points outside the file".into()));
        }
        let index = storage
            .read_range(path, index_offset..index_offset + index_len)
            .await?;
        if crc32fast::hash(&index) != index_crc {
            return Err(corrupt("index CRC32 mismatch".into()));
        }
        let sections: Vec<Section> = codec::decode_exact(&index, &what)?;

        let start = storage.read_range(path, 0..16).await?;
        if &start[0..8] != DATA_MAGIC {
            return Err(corrupt("bad magic (not a rockstate savepoint file)".into()));
        }
        let version = be_u32(&start[8..12]);
        if version == 0 || version > DATA_VERSION {
            return Err(Error::UnsupportedVersion {
                what: what.clone(),
                found: version,
                supported: DATA_VERSION,
            });
        }
        let header_len = u64::from(be_u32(&start[12..16]));
        let header_end = 16 + header_len + 4;
        if header_len > MAX_META_LEN || header_end > index_offset {
            return Err(corrupt("the header length points outside the file".into()));
        }
        let framed = storage.read_range(path, 0..header_end).await?;
        let body = framed.len() - 4;
        if crc32fast::hash(&framed[..body]) != be_u32(&framed[body..]) {
            return Err(corrupt("header CRC32 mismatch".into()));
        }
        let header: FileHeader = if version < 2 {
            crate::format::decode_legacy(|| codec::decode_exact(&framed[16..body], &what))?
        } else {
            codec::decode_exact(&framed[16..body], &what)?
        };
        keygroup::validate_max_parallelism(header.max_parallelism)
            .map_err(|e| corrupt(e.to_string()))?;
        if !header.key_group_range.fits(header.max_parallelism) {
            return Err(corrupt("key-group range beyond the max parallelism".into()));
        }
        if sections.len() as u64 != u64::from(header.key_group_range.len()) {
            return Err(corrupt(format!(
                "{} sections for {} key groups",
                sections.len(),
                header.key_group_range.len()
            )));
        }
        let mut next = header_end;
        for s in &sections {
            if s.offset != next || s.offset.checked_add(s.len).is_none_or(|e| e > index_offset) {
                return Err(corrupt(
                    "the index does not describe consecutive sections".into(),
                ));
            }
            next = s.offset + s.len;
        }
        if next != index_offset {
            return Err(corrupt("the sections do not end at the index".into()));
        }
        Ok(Self {
            storage: storage.clone(),
            path: path.to_string(),
            header,
            sections,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// The section of each key group, in key-group order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::corrupt(
            format!("savepoint file {}", self.storage.url_of(&self.path)),
            detail.into(),
        )
    }

    /// Calls `f` for every entry of key group `kg`, block by block (memory: one read
    /// window and one block). Errors from `f` stop the read.
    ///
    /// Errors: `InvalidArgument` when `kg` is not in the file; `Corrupt` naming the file
    /// and key group for a damaged block.
    pub async fn read_key_group(
        &self,
        kg: u16,
        mut f: impl FnMut(Entry<'_>) -> Result<()>,
    ) -> Result<()> {
        let range = self.header.key_group_range;
        if !range.contains(kg) {
            return Err(Error::invalid(format!(
                "key group {kg} is not in savepoint file {} ({range})",
                self.path
            )));
        }
        let section = self.sections[usize::from(kg - range.start())];
        let end = section.offset + section.len;
        let mut pos = section.offset;
        let mut window = Bytes::new();
        let mut window_start = pos;
        let mut entries = 0u64;
        while pos < end {
            let have = |len: u64, window: &Bytes, window_start: u64| {
                pos >= window_start && pos + len <= window_start + window.len() as u64
            };
            if !have(BLOCK_HEADER_LEN as u64, &window, window_start) {
                let to = end.min(pos + READ_WINDOW.max(BLOCK_HEADER_LEN as u64));
                window = self.storage.read_range(&self.path, pos..to).await?;
                crate::storage::count_restored(window.len() as u64);
                crate::storage::count_fetched(window.len() as u64);
                window_start = pos;
            }
            let at = (pos - window_start) as usize;
            if window.len() < at + BLOCK_HEADER_LEN {
                return Err(self.corrupt(format!("key group {kg}: a block header is cut off")));
            }
            let tag = window[at];
            let stored_len = u64::from(be_u32(&window[at + 1..]));
            let raw_len = u64::from(be_u32(&window[at + 5..]));
            let block_len = BLOCK_HEADER_LEN as u64 + stored_len + 4;
            if pos + block_len > end {
                return Err(self.corrupt(format!("key group {kg}: a block runs past its section")));
            }
            if !have(block_len, &window, window_start) {
                let to = end.min(pos + READ_WINDOW.max(block_len));
                window = self.storage.read_range(&self.path, pos..to).await?;
                crate::storage::count_restored(window.len() as u64);
                crate::storage::count_fetched(window.len() as u64);
                window_start = pos;
            }
            let at = (pos - window_start) as usize;
            let block = &window[at..at + block_len as usize];
            let body = block.len() - 4;
            if crc32fast::hash(&block[..body]) != be_u32(&block[body..]) {
                return Err(self.corrupt(format!(
                    "key group {kg}: block CRC32 mismatch at offset {pos}"
                )));
            }
            let stored = &block[BLOCK_HEADER_LEN..body];
            let raw: std::borrow::Cow<'_, [u8]> = match tag {
                0 if raw_len == stored_len => stored.into(),
                1 if raw_len <= MAX_BLOCK_RAW && raw_len <= stored_len.saturating_mul(255) + 64 => {
                    lz4_flex::block::decompress(stored, raw_len as usize)
                        .map_err(|e| self.corrupt(format!("key group {kg}: {e}")))?
                        .into()
                }
                _ => {
                    return Err(self.corrupt(format!(
                        "key group {kg}: bad block (compression {tag}, {stored_len} stored, {raw_len} raw bytes)"
                    )))
                }
            };
            entries += self.decode_entries(kg, &raw, &mut f)?;
            pos += block_len;
        }
        if entries != section.entries {
            return Err(self.corrupt(format!(
                "key group {kg}: {entries} entries, {} in the index",
                section.entries
            )));
        }
        Ok(())
    }

    fn decode_entries(
        &self,
        kg: u16,
        mut raw: &[u8],
        f: &mut impl FnMut(Entry<'_>) -> Result<()>,
    ) -> Result<u64> {
        let states = self.header.states.len();
        let mut count = 0;
        let cut = || self.corrupt(format!("key group {kg}: an entry is cut off"));
        while !raw.is_empty() {
            if raw.len() < 6 {
                return Err(cut());
            }
            let state = u16::from_be_bytes([raw[0], raw[1]]);
            if usize::from(state) >= states {
                return Err(self.corrupt(format!("key group {kg}: unknown state index {state}")));
            }
            let key_len = be_u32(&raw[2..]) as usize;
            let rest = &raw[6..];
            if rest.len() < key_len + 4 {
                return Err(cut());
            }
            let (key, rest) = rest.split_at(key_len);
            let value_len = be_u32(rest) as usize;
            let rest = &rest[4..];
            if rest.len() < value_len {
                return Err(cut());
            }
            let (value, rest) = rest.split_at(value_len);
            f(Entry {
                state,
                key_group: kg,
                key,
                value,
            })?;
            count += 1;
            raw = rest;
        }
        Ok(count)
    }
}
