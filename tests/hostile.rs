//! Nothing read from storage can crash the process or exhaust its memory: the decoders
//! of `_metadata`, state handles and canonical savepoint files, fed hostile bytes.
//! Paths and symlinks: `hostile_paths.rs`; numbers used in arithmetic:
//! `hostile_numbers.rs`.
//!
//! Every hostile input derives from real encodings: a checkpoint, canonical savepoints
//! (plain and LZ4 blocks) and a native savepoint taken by a real backend (what differs from
//! run to run, such as times and generated names, normalised away), mutated with fixed
//! seeds: every run checks the same cases. About 280,000 in all: 130,000 `_metadata`,
//! 64,000 state handles, 41,000 length claims, 45,000 data files through the reader and
//! 100 full restores (each test asserts its own minimum).
//!
//! What each test proves:
//! - `metadata_decode_survives_hostile_bytes`: [`CheckpointMetadata::decode`] on random
//!   bytes and on mutated real `_metadata` (raw, and with the payload mutated and the frame
//!   repaired so the decoder itself is reached; format 1 included) never panics, fails only
//!   with `Corrupt`/`Incompatible`, returns promptly, never allocates more than the codec's
//!   1 GiB limit at once, and whatever it accepts is safe to use (validated, every path
//!   relative and inside the root, stable through encode and decode).
//! - `handle_decode_survives_hostile_bytes`: the same for [`KeyedStateHandle::decode`].
//! - `length_claims_fail_promptly_without_allocating`: every position of every real
//!   encoding overwritten with (or preceded by) a claim of 2^32 to 2^64 - 1 elements fails
//!   promptly with a typed error, without an out-of-memory abort.
//! - `canonical_reader_survives_hostile_files`: mutated real `state.rkss` files (raw
//!   damage, repaired CRCs, overwritten length and offset fields, length claims in the
//!   header and index, rebuilt headers, indexes, blocks and entries) read through
//!   [`DataFileReader`] over a `memory://` store: typed errors only, bounded allocation,
//!   and every entry handed out names a state of the header and its own key group.
//! - `canonical_restore_survives_hostile_files`: such files restored through
//!   [`RestoreSource`] at one and two subtasks and read back through typed state: typed
//!   errors only, and a failed restore leaves nothing behind.
//! - `string_length_claims_allocate_no_more_than_the_input_justifies`: a string length
//!   claim allocates at most what the codec allows for the input's size (16 times it, at
//!   least 64 KiB), not the codec's absolute limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rockstate::checkpoint::{OperatorState, SnapshotKind};
use rockstate::savepoint::canonical::{DataFileReader, FileHeader, Section};
use rockstate::savepoint::Compression;
use rockstate::{
    BackendOptions, CheckpointMetadata, CheckpointStorage, ErrorKind, KeyedSnapshot,
    KeyedStateHandle, RestoreOptions, RestoreSource, RocksStateBackend, StateMeta,
};
use serde::Serialize;

mod common;

use common::snapshots::*;

// ---------------------------------------------------------------------------------------
// Allocation accounting: the largest single allocation requested on the current thread.

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread, and how long it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    LARGEST.with(|c| c.set(0));
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    (out, LARGEST.with(Cell::get), took)
}

/// `rockstate::codec`'s limit on one decoded value (`DECODE_LIMIT`, 1 GiB).
const CODEC_LIMIT: usize = 1 << 30;
/// What a decoder may allocate at once whatever the input: serde preallocates at most
/// 1 MiB for a sequence of unknown true length.
const SMALL_ALLOCATION: usize = 1 << 20;
/// A decode that takes longer than this is treated as hanging (debug build, busy machine).
const PROMPT: Duration = Duration::from_secs(2);

/// The largest allocation a decode of `input_len` bytes can justify.
fn justified(input_len: usize) -> usize {
    SMALL_ALLOCATION + 64 * input_len
}

// ---------------------------------------------------------------------------------------
// Deterministic randomness and mutations.

use rockstate::testing::SeededRng as Rng;

/// Bincode variable-length integers (big-endian) claiming huge lengths or values.
const HUGE_VARINTS: &[&[u8]] = &[
    &[0xfb, 0xff, 0xff],
    &[0xfc, 0xff, 0xff, 0xff, 0xff],
    &[0xfc, 0x80, 0x00, 0x00, 0x00],
    &[0xfd, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0xfd, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
    &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xfd, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xff],
];

/// Values for fixed-width big-endian u32 and u64 fields.
const HUGE_U32: &[u32] = &[0, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_fff0, u32::MAX];
const HUGE_U64: &[u64] = &[0, 1 << 32, 1 << 40, 1 << 62, u64::MAX - 23, u64::MAX];

/// Applies one to three random mutations to `bytes`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.index(3) {
        mutate_once(rng, bytes);
    }
}

fn mutate_once(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let len = bytes.len();
    let at = rng.index(len.max(1));
    match rng.index(11) {
        0 | 1 if len > 0 => bytes[at] ^= 1 << rng.index(8),
        2 if len > 0 => {
            bytes[at] = *rng.pick(&[0x00, 0x01, 0x7f, 0x80, 0xfa, 0xfb, 0xfc, 0xfd, 0xff])
        }
        3 if len > 0 => bytes[at] = rng.next_u64() as u8,
        4 => bytes.truncate(rng.index(len + 1)),
        5 => {
            let n = 1 + rng.index(8);
            let extra = rng.bytes(n);
            let at = rng.index(len + 1);
            bytes.splice(at..at, extra);
        }
        6 if len > 0 => {
            let end = (at + 1 + rng.index(16)).min(len);
            bytes.drain(at..end);
        }
        7 if len > 0 => {
            let end = (at + 1 + rng.index(32)).min(len);
            let copy = bytes[at..end].to_vec();
            let to = rng.index(len + 1);
            bytes.splice(to..to, copy);
        }
        8 => {
            // A length claim replacing (or inserted before) whatever was there.
            let claim = *rng.pick(HUGE_VARINTS);
            let at = rng.index(len + 1);
            let end = if rng.percent(50) {
                (at + 1).min(len)
            } else {
                at
            };
            bytes.splice(at..end, claim.iter().copied());
        }
        9 if len >= 4 => {
            let at = rng.index(len - 3);
            bytes[at..at + 4].copy_from_slice(&rng.pick(HUGE_U32).to_be_bytes());
        }
        10 if len >= 8 => {
            let at = rng.index(len - 7);
            bytes[at..at + 8].copy_from_slice(&rng.pick(HUGE_U64).to_be_bytes());
        }
        _ => bytes.push(rng.next_u64() as u8),
    }
}

// ---------------------------------------------------------------------------------------
// Framing of `_metadata` (magic, version, length, payload, CRC32 over all before it).

const META_HEADER: usize = 16;

fn frame_metadata(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = b"RKSTMETA".to_vec();
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn metadata_payload(file: &[u8]) -> (u32, &[u8]) {
    let version = u32::from_be_bytes(file[8..12].try_into().unwrap());
    (version, &file[META_HEADER..file.len() - 4])
}

/// Format version 1 of `_metadata`, where keyed state was always a file handle.
#[derive(Serialize)]
struct V1Metadata<'a> {
    checkpoint_id: u64,
    kind: SnapshotKind,
    job_id: &'a str,
    triggered_at_ms: u64,
    completed_at_ms: u64,
    operators: Vec<V1Operator<'a>>,
}

#[derive(Serialize)]
struct V1Operator<'a> {
    uid: &'a str,
    uid_hash: &'a str,
    parallelism: u32,
    max_parallelism: u32,
    states: Vec<LegacyState<'a>>,
    subtasks: Vec<V1Subtask<'a>>,
}

#[derive(Serialize)]
struct V1Subtask<'a> {
    keyed: Option<LegacyHandle<'a>>,
    operator_state: &'a OperatorState,
}

/// A state description as written before type structures were recorded.
#[derive(Serialize)]
struct LegacyState<'a> {
    name: &'a str,
    kind: rockstate::StateKind,
    key_type: &'a str,
    namespace_type: &'a str,
    user_key_type: Option<&'a str>,
    value_type: &'a str,
    serializer_version: u32,
    ttl_millis: Option<u64>,
}

fn legacy_states(states: &[StateMeta]) -> Vec<LegacyState<'_>> {
    states
        .iter()
        .map(|s| LegacyState {
            name: &s.name,
            kind: s.kind,
            key_type: &s.key_type.rust_name,
            namespace_type: &s.namespace_type.rust_name,
            user_key_type: s.user_key_type.as_ref().map(|t| t.rust_name.as_str()),
            value_type: &s.value_type.rust_name,
            serializer_version: s.serializer_version,
            ttl_millis: s.ttl_millis,
        })
        .collect()
}

/// A file handle with its states as written before type structures were recorded.
#[derive(Serialize)]
struct LegacyHandle<'a> {
    backend_uid: &'a str,
    checkpoint_id: u64,
    key_group_range: rockstate::KeyGroupRange,
    max_parallelism: u32,
    incremental: bool,
    shared: &'a [rockstate::format::StateFile],
    private: &'a [rockstate::format::StateFile],
    states: Vec<LegacyState<'a>>,
    uploaded_bytes: u64,
}

fn legacy_handle(h: &KeyedStateHandle) -> LegacyHandle<'_> {
    LegacyHandle {
        backend_uid: &h.backend_uid,
        checkpoint_id: h.checkpoint_id,
        key_group_range: h.key_group_range,
        max_parallelism: h.max_parallelism,
        incremental: h.incremental,
        shared: &h.shared,
        private: &h.private,
        states: legacy_states(&h.states),
        uploaded_bytes: h.uploaded_bytes,
    }
}

/// `meta` (a checkpoint: file handles only) written as format 1.
fn encode_v1(meta: &CheckpointMetadata) -> Vec<u8> {
    let v1 = V1Metadata {
        checkpoint_id: meta.checkpoint_id,
        kind: meta.kind,
        job_id: &meta.job_id,
        triggered_at_ms: meta.triggered_at_ms,
        completed_at_ms: meta.completed_at_ms,
        operators: meta
            .operators
            .iter()
            .map(|op| V1Operator {
                uid: &op.uid,
                uid_hash: &op.uid_hash,
                parallelism: op.parallelism,
                max_parallelism: op.max_parallelism,
                states: legacy_states(&op.states),
                subtasks: op
                    .subtasks
                    .iter()
                    .map(|s| V1Subtask {
                        keyed: s
                            .keyed
                            .as_ref()
                            .map(|k| legacy_handle(k.as_files().expect("file handle"))),
                        operator_state: &s.operator_state,
                    })
                    .collect(),
            })
            .collect(),
    };
    frame_metadata(1, &rockstate::codec::encode_key(&v1).unwrap())
}

// ---------------------------------------------------------------------------------------
// Checks shared by the decoding tests.

fn is_plain_name(name: &str) -> bool {
    is_inside_root(name) && !name.contains('/')
}

/// What an accepted `_metadata` must satisfy before anything touches storage.
fn assert_safe_metadata(meta: &CheckpointMetadata) {
    for (op, keyed) in meta.keyed() {
        keyed.validate().unwrap();
        assert_eq!(keyed.max_parallelism(), op.max_parallelism);
        assert!(keyed.key_group_range().fits(keyed.max_parallelism()));
        for file in keyed.files() {
            assert!(is_inside_root(&file.path), "accepted path {:?}", file.path);
        }
        // Local names become file names only for file handles (a canonical data file is
        // read in place: see `hostile_paths_are_refused_by_every_consumer`).
        if let Some(h) = keyed.as_files() {
            for file in h.files() {
                assert!(
                    is_plain_name(&file.local_name),
                    "accepted local name {:?}",
                    file.local_name
                );
            }
            assert!(h.shared.iter().all(|f| f.path.starts_with("shared/")));
        }
    }
    for op in &meta.operators {
        assert_eq!(op.subtasks.len(), op.parallelism as usize);
    }
    // What was accepted encodes and decodes to itself.
    let again = meta.encode().unwrap();
    assert_eq!(&CheckpointMetadata::decode(&again, "again").unwrap(), meta);
}

fn assert_safe_handle(handle: &KeyedStateHandle) {
    handle.validate().unwrap();
    for file in handle.files() {
        assert!(is_inside_root(&file.path), "accepted path {:?}", file.path);
        assert!(is_plain_name(&file.local_name), "{:?}", file.local_name);
    }
    assert!(handle.shared.iter().all(|f| f.path.starts_with("shared/")));
    assert!(handle.key_group_range.fits(handle.max_parallelism));
    let again = handle.encode().unwrap();
    assert_eq!(&KeyedStateHandle::decode(&again).unwrap(), handle);
}

#[derive(Default, Debug)]
struct Tally {
    cases: u64,
    accepted: u64,
    corrupt: u64,
    incompatible: u64,
}

impl Tally {
    fn error(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Corrupt => self.corrupt += 1,
            ErrorKind::Incompatible => self.incompatible += 1,
            _ => {}
        }
    }
}

/// Decodes `bytes` as `_metadata` and checks every guarantee; `limit` is the largest
/// single allocation allowed.
fn check_metadata(bytes: &[u8], limit: usize, tally: &mut Tally) {
    tally.cases += 1;
    let (result, largest, took) = measured(|| CheckpointMetadata::decode(bytes, "hostile"));
    assert!(
        took < PROMPT,
        "decoding {} bytes took {took:?}: {bytes:02x?}",
        bytes.len()
    );
    assert!(
        largest <= limit,
        "decoding {} bytes allocated {largest} bytes at once: {bytes:02x?}",
        bytes.len()
    );
    match result {
        Ok(meta) => {
            tally.accepted += 1;
            assert_safe_metadata(&meta);
        }
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Incompatible),
                "{:?}: {e}",
                e.kind()
            );
            tally.error(e.kind());
        }
    }
}

fn check_handle(bytes: &[u8], limit: usize, tally: &mut Tally) {
    tally.cases += 1;
    let (result, largest, took) = measured(|| KeyedStateHandle::decode(bytes));
    assert!(took < PROMPT, "decoding took {took:?}: {bytes:02x?}");
    assert!(
        largest <= limit,
        "decoding {} bytes allocated {largest} bytes at once: {bytes:02x?}",
        bytes.len()
    );
    match result {
        Ok(handle) => {
            tally.accepted += 1;
            assert_safe_handle(&handle);
        }
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Incompatible),
                "{:?}: {e}",
                e.kind()
            );
            tally.error(e.kind());
        }
    }
}

/// `meta` with what differs from run to run (times, backend uids, generated file names,
/// sizes and checksums of RocksDB files) replaced by fixed values of the same shape, so
/// that the seeded mutations are the same cases in every run.
fn normalized(mut meta: CheckpointMetadata) -> CheckpointMetadata {
    meta.triggered_at_ms = 1_700_000_000_000 + meta.checkpoint_id;
    meta.completed_at_ms = meta.triggered_at_ms + 250;
    // Format 1 has no writer epoch: the same metadata reads back with epoch 0.
    meta.writer_epoch = 0;
    let mut n = 0u64;
    let mut fixed = |file: &mut rockstate::StateFile| {
        n += 1;
        if file.path.starts_with("shared/") {
            file.path = format!("shared/{:032x}.sst", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        } else if file.path.starts_with("chk-") {
            // `chk-N/<uid hash>/<subtask>/<unique upload folder>/<name>`.
            let mut parts: Vec<String> = file.path.split('/').map(str::to_string).collect();
            if parts.len() == 5 {
                parts[3] = format!("{:016x}", parts[2].len());
                file.path = parts.join("/");
            }
        }
        file.size = 1_000 + 37 * n;
        file.crc32 = (n as u32).wrapping_mul(0x85eb_ca6b);
    };
    for op in &mut meta.operators {
        for (i, subtask) in op.subtasks.iter_mut().enumerate() {
            match &mut subtask.keyed {
                Some(KeyedSnapshot::Files(h)) => {
                    h.backend_uid = format!("{:032x}", i + 1);
                    h.shared.iter_mut().for_each(&mut fixed);
                    h.private.iter_mut().for_each(&mut fixed);
                    h.uploaded_bytes = h.new_shared().chain(&h.private).map(|f| f.size).sum();
                }
                Some(KeyedSnapshot::Canonical(h)) => fixed(&mut h.file),
                None => {}
            }
        }
    }
    CheckpointMetadata::decode(&meta.encode().unwrap(), "normalized").unwrap()
}

/// The real `_metadata` encodings, normalized: checkpoint (format 2 and 1), canonical
/// savepoints, native savepoint.
fn metadata_seeds(f: &Fixture) -> Vec<Vec<u8>> {
    let checkpoint = normalized(Fixture::decoded(&f.checkpoint));
    let v1 = encode_v1(&checkpoint);
    // Format 1 still reads, as the same metadata less the type structures it could not
    // record.
    let mut without_structures = checkpoint.clone();
    let strip = |states: &mut Vec<StateMeta>| {
        for s in states {
            for t in [&mut s.key_type, &mut s.namespace_type, &mut s.value_type]
                .into_iter()
                .chain(s.user_key_type.as_mut())
            {
                t.schema = None;
            }
        }
    };
    for op in &mut without_structures.operators {
        strip(&mut op.states);
        for sub in &mut op.subtasks {
            if let Some(rockstate::format::KeyedSnapshot::Files(h)) = sub.keyed.as_mut() {
                strip(&mut h.states);
            }
        }
    }
    assert_eq!(
        Fixture::decoded(&v1),
        without_structures,
        "format 1 compatibility"
    );
    let mut seeds = vec![checkpoint.encode().unwrap(), v1];
    for savepoint in [&f.plain, &f.lz4, &f.native] {
        seeds.push(normalized(Fixture::decoded(savepoint)).encode().unwrap());
    }
    seeds
}

/// The checkpoint's subtask 0 handle, normalized.
fn handle_seed(f: &Fixture) -> KeyedStateHandle {
    let meta = normalized(Fixture::decoded(&f.checkpoint));
    let handle = meta.handles().next().unwrap().1.clone();
    assert_eq!(handle.backend_uid.len(), f.handle.backend_uid.len());
    handle
}

// ---------------------------------------------------------------------------------------
// 1. Hostile bytes for the decoders.

const METADATA_RANDOM: u64 = 6_000;
const METADATA_RAW: u64 = 20_000;
const METADATA_REFRAMED: u64 = 100_000;

#[test]
fn metadata_decode_survives_hostile_bytes() {
    let f = runtime().block_on(fixture(1));
    let seeds = metadata_seeds(&f);
    let crcs: Vec<String> = seeds
        .iter()
        .map(|s| format!("{}:{:08x}", s.len(), crc32fast::hash(s)))
        .collect();
    eprintln!("seeds (length:CRC32): {crcs:?}");
    let mut rng = Rng::new(0x6d65_7461_0001);
    let mut tally = Tally::default();

    // Random bytes, bare or framed with a valid header and CRC (so the payload decoder
    // sees them).
    for i in 0..METADATA_RANDOM {
        let n = rng.index(600);
        let random = rng.bytes(n);
        let bytes = if i % 2 == 0 {
            random
        } else {
            frame_metadata(1 + (i % 4 == 1) as u32, &random)
        };
        check_metadata(&bytes, CODEC_LIMIT, &mut tally);
    }
    // Mutations of the whole file: the frame (magic, version, length, CRC) is attacked.
    for i in 0..METADATA_RAW {
        let mut bytes = seeds[i as usize % seeds.len()].clone();
        mutate(&mut rng, &mut bytes);
        check_metadata(&bytes, CODEC_LIMIT, &mut tally);
    }
    // Mutations of the payload, reframed with a correct length and CRC: the decoder and
    // the validation are attacked.
    for i in 0..METADATA_REFRAMED {
        let seed = &seeds[i as usize % seeds.len()];
        let (version, payload) = metadata_payload(seed);
        let mut payload = payload.to_vec();
        mutate(&mut rng, &mut payload);
        let version = if rng.percent(3) {
            1 + version % 2
        } else {
            version
        };
        check_metadata(&frame_metadata(version, &payload), CODEC_LIMIT, &mut tally);
    }
    // Every seed, cut at every length.
    for seed in &seeds {
        for cut in 0..seed.len() {
            check_metadata(&seed[..cut], CODEC_LIMIT, &mut tally);
        }
    }
    eprintln!("metadata: {tally:?}");
    assert!(tally.cases >= 130_000, "{tally:?}");
    assert!(tally.corrupt > 0 && tally.incompatible > 0, "{tally:?}");
}

const HANDLE_RANDOM: u64 = 3_000;
const HANDLE_MUTATED: u64 = 60_000;

#[test]
fn handle_decode_survives_hostile_bytes() {
    let f = runtime().block_on(fixture(1));
    let seed = handle_seed(&f);
    let real = seed.encode().unwrap();
    assert_eq!(KeyedStateHandle::decode(&real).unwrap(), seed);
    let mut rng = Rng::new(0x6861_6e64_0002);
    let mut tally = Tally::default();
    for i in 0..HANDLE_RANDOM {
        let n = rng.index(400);
        let mut bytes = rng.bytes(n);
        if i % 2 == 1 && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&1u32.to_be_bytes());
        }
        check_handle(&bytes, CODEC_LIMIT, &mut tally);
    }
    for _ in 0..HANDLE_MUTATED {
        let mut bytes = real.clone();
        mutate(&mut rng, &mut bytes);
        check_handle(&bytes, CODEC_LIMIT, &mut tally);
    }
    for cut in 0..real.len() {
        check_handle(&real[..cut], CODEC_LIMIT, &mut tally);
    }
    eprintln!("handle: {tally:?}");
    assert!(tally.cases >= 63_000, "{tally:?}");
}

/// Claims of 2^32, 2^40, 2^63 - 1 and 2^64 - 1 elements or bytes (bincode varints).
const CLAIMS: &[&[u8]] = &[
    &[0xfc, 0xff, 0xff, 0xff, 0xff],
    &[0xfd, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0xfd, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
];

/// `bytes` with `claim` replacing the byte at `at` (or inserted before it).
fn claimed(bytes: &[u8], at: usize, claim: &[u8], replace: bool) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let end = if replace { at + 1 } else { at };
    out.splice(at..end, claim.iter().copied());
    out
}

/// Every position of every real `_metadata` and handle encoding, overwritten with (or
/// preceded by) a claim of 2^32 or more elements or bytes, each checked with `limit` as the
/// largest allocation allowed.
fn length_claim_sweep(f: &Fixture, limit: impl Fn(usize) -> usize) -> Tally {
    let mut tally = Tally::default();
    for seed in metadata_seeds(f) {
        let (version, payload) = metadata_payload(&seed);
        for at in 0..payload.len() {
            for claim in CLAIMS {
                for replace in [true, false] {
                    let bytes = frame_metadata(version, &claimed(payload, at, claim, replace));
                    check_metadata(&bytes, limit(bytes.len()), &mut tally);
                }
            }
        }
        // The frame's own length field.
        for len in HUGE_U32 {
            let mut bytes = seed.clone();
            bytes[12..16].copy_from_slice(&len.to_be_bytes());
            check_metadata(&bytes, limit(bytes.len()), &mut tally);
        }
    }
    let handle = handle_seed(f).encode().unwrap();
    for at in 4..handle.len() {
        for claim in CLAIMS {
            for replace in [true, false] {
                let bytes = claimed(&handle, at, claim, replace);
                check_handle(&bytes, limit(bytes.len()), &mut tally);
            }
        }
    }
    tally
}

/// A claim of 2^32 or more fails at once (bincode checks it against its limit before
/// allocating); whatever the misaligned rest of the input then claims stays below the
/// codec's limit, so a hostile input never aborts the process.
#[test]
fn length_claims_fail_promptly_without_allocating() {
    let f = runtime().block_on(fixture(1));
    let tally = length_claim_sweep(&f, |_| CODEC_LIMIT);
    eprintln!("length claims: {tally:?}");
    // Accepted inputs are those where the claim landed on a plain number (an id, a
    // timestamp, a size): they passed `assert_safe_metadata`.
    assert!(tally.cases >= 40_000, "{tally:?}");
}

// ---------------------------------------------------------------------------------------
// The canonical data file (`state.rkss`).

const DATA_FOOTER: usize = 24;
const BLOCK_HEADER: usize = 9;

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().unwrap())
}

/// A data file's header as written, with the key-group range as two plain numbers so that
/// invalid ranges can be written too.
#[derive(Serialize, Clone)]
struct RawHeader {
    checkpoint_id: u64,
    max_parallelism: u32,
    start: u16,
    end: u16,
    states: Vec<StateMeta>,
    compression: Compression,
}

impl RawHeader {
    fn of(h: &FileHeader) -> Self {
        Self {
            checkpoint_id: h.checkpoint_id,
            max_parallelism: h.max_parallelism,
            start: h.key_group_range.start(),
            end: h.key_group_range.end(),
            states: h.states.clone(),
            compression: h.compression,
        }
    }
}

/// A real data file taken apart: header, blocks (as bytes between the header and the
/// index) and sections relative to the start of the blocks.
#[derive(Clone)]
struct DataParts {
    header: RawHeader,
    blocks: Vec<u8>,
    sections: Vec<Section>,
}

impl DataParts {
    async fn of(bytes: &[u8], storage: &CheckpointStorage, rel: &str) -> Self {
        storage.delete(rel).await.unwrap();
        storage
            .put_if_absent(rel, Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
        let reader = DataFileReader::open(storage, rel, bytes.len() as u64)
            .await
            .unwrap();
        let start = reader.sections()[0].offset;
        let end = bytes.len() - DATA_FOOTER;
        let index_offset = be64(&bytes[end..]) as usize;
        Self {
            header: RawHeader::of(reader.header()),
            blocks: bytes[start as usize..index_offset].to_vec(),
            sections: reader
                .sections()
                .iter()
                .map(|s| Section {
                    offset: s.offset - start,
                    ..*s
                })
                .collect(),
        }
    }

    /// The file: framed header, blocks, index with absolute offsets, footer.
    fn assemble(&self) -> Vec<u8> {
        self.assemble_with(&rockstate::codec::encode_key(&self.header).unwrap())
    }

    /// The file with `payload` as the header's encoding.
    fn assemble_with(&self, payload: &[u8]) -> Vec<u8> {
        self.assemble_raw(payload, |index| index)
    }

    /// The file with `payload` as the header's encoding and `index` applied to the
    /// encoding of the index (the footer describes whatever it returns).
    fn assemble_raw(&self, payload: &[u8], index: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
        let mut out = b"RKSTSAVP".to_vec();
        out.extend_from_slice(&rockstate::savepoint::canonical::DATA_VERSION.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        let base = out.len() as u64;
        out.extend_from_slice(&self.blocks);
        let sections: Vec<Section> = self
            .sections
            .iter()
            .map(|s| Section {
                offset: s.offset.wrapping_add(base),
                ..*s
            })
            .collect();
        let index = index(rockstate::codec::encode_key(&sections).unwrap());
        let index_offset = out.len() as u64;
        out.extend_from_slice(&index);
        out.extend_from_slice(&index_offset.to_be_bytes());
        out.extend_from_slice(&(index.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(&index).to_be_bytes());
        out.extend_from_slice(b"RKSTSEND");
        out
    }

    /// Offsets (in `blocks`) of every block.
    fn block_offsets(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + BLOCK_HEADER <= self.blocks.len() {
            out.push(pos);
            pos += BLOCK_HEADER + be32(&self.blocks[pos + 1..]) as usize + 4;
        }
        out
    }

    /// Offsets (in `blocks`) of every entry of every uncompressed block.
    fn entry_offsets(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for block in self.block_offsets() {
            if self.blocks[block] != 0 {
                continue;
            }
            let body = block + BLOCK_HEADER;
            let end = body + be32(&self.blocks[block + 1..]) as usize;
            let mut pos = body;
            while pos + 6 <= end {
                out.push(pos);
                let key = be32(&self.blocks[pos + 2..]) as usize;
                let value = be32(&self.blocks[pos + 6 + key..]) as usize;
                pos += 6 + key + 4 + value;
            }
        }
        out
    }
}

/// Makes every CRC of a (possibly damaged) data file match its content wherever the
/// damaged lengths still allow finding it: the header's, every block's, the index's.
fn repair_crcs(bytes: &mut [u8]) {
    let len = bytes.len();
    if len < 16 {
        return;
    }
    let header_len = be32(&bytes[12..]) as usize;
    let header_end = 16 + header_len;
    if header_end + 4 <= len {
        let crc = crc32fast::hash(&bytes[..header_end]);
        bytes[header_end..header_end + 4].copy_from_slice(&crc.to_be_bytes());
    }
    if len < DATA_FOOTER {
        return;
    }
    let footer = len - DATA_FOOTER;
    let index_offset = be64(&bytes[footer..]);
    let index_len = u64::from(be32(&bytes[footer + 8..]));
    let index = index_offset
        .checked_add(index_len)
        .filter(|end| *end <= footer as u64)
        .map(|end| index_offset as usize..end as usize);
    let blocks_end = index.as_ref().map_or(footer, |i| i.start);
    let mut pos = header_end + 4;
    while pos + BLOCK_HEADER <= blocks_end {
        let stored = be32(&bytes[pos + 1..]) as usize;
        let body_end = pos + BLOCK_HEADER + stored;
        if body_end + 4 > blocks_end {
            break;
        }
        let crc = crc32fast::hash(&bytes[pos..body_end]);
        bytes[body_end..body_end + 4].copy_from_slice(&crc.to_be_bytes());
        pos = body_end + 4;
    }
    if let Some(index) = index {
        let crc = crc32fast::hash(&bytes[index]);
        bytes[footer + 12..footer + 16].copy_from_slice(&crc.to_be_bytes());
    }
}

/// Names a state read from a file might carry.
fn hostile_names() -> Vec<String> {
    vec![
        String::new(),
        "a/b".into(),
        "..".into(),
        "../../x".into(),
        "nul\0name".into(),
        "default".into(),
        "count".into(),
        "x".repeat(5_000),
        "\u{202e}rtl".into(),
    ]
}

/// A recorded type with a hostile name or structure: children after parents, dangling
/// containers, nesting too deep.
fn hostile_type(rng: &mut Rng) -> rockstate::format::TypeInfo {
    use rockstate::format::schema::{Node, TypeSchema};
    let name = rng.pick(&hostile_names()).clone();
    let mut deep = vec![Node::U8];
    for i in 0..300u32 {
        deep.push(Node::Seq(i));
    }
    let schema = rng
        .pick(&[
            None,
            Some(vec![Node::Seq(1), Node::U8]),
            Some(vec![Node::Named(7)]),
            Some(vec![]),
            Some(deep),
        ])
        .clone()
        .map(|nodes| TypeSchema {
            nodes,
            containers: Vec::new(),
        });
    rockstate::format::TypeInfo {
        rust_name: name.clone(),
        name,
        schema,
    }
}

/// A structurally valid file with hostile content: changed header fields, index or
/// entries, with every CRC correct.
fn semantic_mutation(rng: &mut Rng, real: &DataParts) -> Vec<u8> {
    let mut p = real.clone();
    let n_states = p.header.states.len();
    match rng.index(20) {
        0 => p.header.states.clear(),
        1 => {
            p.header.states.pop();
        }
        2 => {
            let s = p.header.states[rng.index(n_states)].clone();
            p.header.states.push(s);
        }
        3 => {
            let k = rng.index(n_states);
            p.header.states[k].name = rng.pick(&hostile_names()).clone();
        }
        4 => {
            let k = rng.index(n_states);
            p.header.states[k].kind = *rng.pick(&[
                rockstate::StateKind::Value,
                rockstate::StateKind::List,
                rockstate::StateKind::Map,
                rockstate::StateKind::Reducing,
                rockstate::StateKind::Aggregating,
            ]);
        }
        5 => {
            let k = rng.index(n_states);
            p.header.states[k].ttl_millis = *rng.pick(&[None, Some(0), Some(1), Some(u64::MAX)]);
        }
        6 => {
            let k = rng.index(n_states);
            let s = &mut p.header.states[k];
            s.user_key_type = match s.user_key_type {
                Some(_) => None,
                None => Some(rockstate::format::TypeInfo::of::<u8>()),
            };
            s.value_type = hostile_type(rng);
        }
        7 => {
            p.header.max_parallelism =
                *rng.pick(&[0, 1, MAX_PAR - 1, MAX_PAR + 1, 32_768, 32_769, u32::MAX]);
        }
        8 => {
            let (start, end) = *rng.pick(&[
                (0, 0),
                (1, 16),
                (0, 15),
                (5, 4),
                (0, 32_767),
                (0, u16::MAX),
                (15, 15),
                (u16::MAX, u16::MAX),
            ]);
            p.header.start = start;
            p.header.end = end;
        }
        9 => p.header.checkpoint_id = u64::MAX,
        10 => {
            let k = rng.index(p.sections.len());
            let s = &mut p.sections[k];
            s.entries = *rng.pick(&[0, s.entries + 1, s.entries.saturating_sub(1), u64::MAX]);
        }
        11 => {
            let k = rng.index(p.sections.len());
            let delta = *rng.pick(&[1u64, 9, u64::MAX, 1 << 40]);
            p.sections[k].len = p.sections[k].len.wrapping_add(delta);
            if k + 1 < p.sections.len() && rng.percent(50) {
                p.sections[k + 1].offset = p.sections[k + 1].offset.wrapping_add(delta);
                p.sections[k + 1].len = p.sections[k + 1].len.wrapping_sub(delta);
            }
        }
        12 => {
            let k = rng.index(p.sections.len());
            p.sections[k].offset = *rng.pick(&[0, 1, u64::MAX - 3, 1 << 40]);
        }
        13 => {
            if rng.percent(50) {
                p.sections.pop();
            } else {
                let last = *p.sections.last().unwrap();
                p.sections.push(Section {
                    offset: last.offset + last.len,
                    len: 0,
                    entries: *rng.pick(&[0, 1, u64::MAX]),
                });
            }
        }
        14 => {
            let (a, b) = (rng.index(p.sections.len()), rng.index(p.sections.len()));
            p.sections.swap(a, b);
        }
        15 => {
            // Every block in one section.
            let entries = p.sections.iter().map(|s| s.entries).sum();
            for s in &mut p.sections {
                *s = Section {
                    offset: p.blocks.len() as u64,
                    len: 0,
                    entries: 0,
                };
            }
            p.sections[0] = Section {
                offset: 0,
                len: p.blocks.len() as u64,
                entries,
            };
        }
        16 | 17 => {
            // A block's header fields.
            let blocks = p.block_offsets();
            if let Some(&at) = blocks.get(rng.index(blocks.len())) {
                let stored = be32(&p.blocks[at + 1..]);
                match rng.index(4) {
                    0 => p.blocks[at] = *rng.pick(&[0, 1, 2, 0xff]),
                    1 => {
                        let raw = *rng.pick(&[
                            0,
                            1,
                            stored.wrapping_sub(1),
                            stored + 1,
                            stored.saturating_mul(255).saturating_add(64),
                            stored.saturating_mul(255).saturating_add(65),
                            1 << 30,
                            (1 << 30) + 1,
                            u32::MAX,
                        ]);
                        p.blocks[at + 5..at + 9].copy_from_slice(&raw.to_be_bytes());
                    }
                    2 => {
                        let v = *rng.pick(&[0, stored - 1, stored + 1, u32::MAX]);
                        p.blocks[at + 1..at + 5].copy_from_slice(&v.to_be_bytes());
                    }
                    _ => {
                        // Garbage compressed or stored bytes.
                        let body = at + BLOCK_HEADER..at + BLOCK_HEADER + stored as usize;
                        let i = body.start + rng.index(body.len());
                        p.blocks[i] = rng.next_u64() as u8;
                    }
                }
            }
        }
        _ => {
            // An entry's fields in an uncompressed block.
            let entries = p.entry_offsets();
            if let Some(&at) = entries.get(rng.index(entries.len())) {
                let key_len = be32(&p.blocks[at + 2..]) as usize;
                match rng.index(4) {
                    0 => {
                        let state = *rng.pick(&[n_states as u16, u16::MAX, 1]);
                        p.blocks[at..at + 2].copy_from_slice(&state.to_be_bytes());
                    }
                    1 => {
                        let v = *rng.pick(HUGE_U32);
                        p.blocks[at + 2..at + 6].copy_from_slice(&v.to_be_bytes());
                    }
                    2 => {
                        let v = *rng.pick(HUGE_U32);
                        let at = at + 6 + key_len;
                        p.blocks[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    }
                    _ => {
                        // A byte of the key or value.
                        let i = at + 6 + rng.index(key_len + 4);
                        p.blocks[i] = rng.next_u64() as u8;
                    }
                }
            }
        }
    }
    let mut bytes = p.assemble();
    repair_crcs(&mut bytes);
    bytes
}

/// One hostile version of a real data file.
fn hostile_data_file(rng: &mut Rng, real: &[u8], parts: &DataParts) -> Vec<u8> {
    match rng.index(4) {
        0 => {
            let mut bytes = real.to_vec();
            mutate(rng, &mut bytes);
            bytes
        }
        1 => {
            let mut bytes = real.to_vec();
            mutate(rng, &mut bytes);
            repair_crcs(&mut bytes);
            bytes
        }
        2 => {
            // A length or offset field of the frame, header or footer.
            let mut bytes = real.to_vec();
            let len = bytes.len();
            let at = *rng.pick(&[12, len - 24, len - 20, len - 16]);
            if at == len - 24 {
                let v = *rng.pick(HUGE_U64);
                bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
            } else {
                let v = *rng.pick(HUGE_U32);
                bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            if rng.percent(70) {
                repair_crcs(&mut bytes);
            }
            bytes
        }
        _ => semantic_mutation(rng, parts),
    }
}

/// Opens `bytes` as a data file and reads every key group, checking what the reader hands
/// out. Returns the entries read, or the reader's error.
async fn read_data_file(
    storage: &CheckpointStorage,
    rel: &str,
    size: u64,
) -> rockstate::Result<u64> {
    let reader = DataFileReader::open(storage, rel, size).await?;
    let header = reader.header().clone();
    assert!(header.key_group_range.fits(header.max_parallelism));
    assert_eq!(reader.sections().len() as u32, header.key_group_range.len());
    let mut entries = 0u64;
    for kg in header.key_group_range.iter() {
        reader
            .read_key_group(kg, |e| {
                assert!(usize::from(e.state) < header.states.len());
                assert_eq!(e.key_group, kg);
                entries += 1;
                Ok(())
            })
            .await?;
    }
    Ok(entries)
}

const READER_CASES: u64 = 40_000;

#[test]
fn canonical_reader_survives_hostile_files() {
    let f = runtime().block_on(fixture(1));
    let (_, plain) = Fixture::data_file(&f.plain_folder, &f.plain);
    let (_, lz4) = Fixture::data_file(&f.lz4_folder, &f.lz4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = CheckpointStorage::open("memory://hostile-reader").unwrap();
    let reals: Vec<(Vec<u8>, DataParts)> = rt.block_on(async {
        let mut out = Vec::new();
        for real in [plain, lz4] {
            let parts = DataParts::of(&real, &store, "real/state.rkss").await;
            // Taking the file apart and assembling it again gives the same bytes.
            assert_eq!(parts.assemble(), real);
            assert_eq!(
                read_data_file(&store, "real/state.rkss", real.len() as u64)
                    .await
                    .unwrap(),
                u64::from(KEYS) * 3,
            );
            out.push((real, parts));
        }
        out
    });
    for (real, _) in &reals {
        eprintln!(
            "seed: {} bytes, CRC32 {:08x}",
            real.len(),
            crc32fast::hash(real)
        );
    }
    assert!(reals[0].1.entry_offsets().len() > 10);
    assert!(reals[1]
        .1
        .block_offsets()
        .iter()
        .any(|&b| reals[1].1.blocks[b] == 1));

    let mut rng = Rng::new(0x726b_7373_0003);
    let (mut deep, mut read, mut errors) = (0u64, 0u64, 0u64);
    let mut cases = 0u64;
    let mut run = |bytes: &[u8], size: u64, cases: &mut u64| {
        *cases += 1;
        let rel = format!("case-{cases}/state.rkss");
        let stored = Bytes::copy_from_slice(bytes);
        let (result, largest, took) = measured(|| {
            rt.block_on(async {
                store.put_if_absent(&rel, stored).await.unwrap();
                let result = read_data_file(&store, &rel, size).await;
                store.delete(&rel).await.unwrap();
                result
            })
        });
        assert!(took < PROMPT, "reading took {took:?}: {bytes:02x?}");
        // An LZ4 block expands at most 255 times; the codec caps any decoded value.
        let limit = CODEC_LIMIT.max(256 * bytes.len());
        assert!(largest <= limit, "allocated {largest} bytes: {bytes:02x?}");
        match result {
            Ok(_) => read += 1,
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Incompatible),
                    "{:?}: {e}",
                    e.kind()
                );
                let message = e.to_string();
                assert!(message.contains("state.rkss"), "{message}");
                if message.contains("key group ") {
                    // Found while reading a section, past every check of the open.
                    deep += 1;
                }
                errors += 1;
            }
        }
    };
    for i in 0..READER_CASES {
        let (real, parts) = &reals[i as usize % reals.len()];
        let bytes = hostile_data_file(&mut rng, real, parts);
        let size = if rng.percent(5) {
            real.len() as u64
        } else {
            bytes.len() as u64
        };
        run(&bytes, size, &mut cases);
    }
    // Every position of the header and index encodings of both files given a length
    // claim of 2^32 or more, everything else consistent (CRCs, footer).
    for (real, parts) in &reals {
        let header = rockstate::codec::encode_key(&parts.header).unwrap();
        let index_len = be32(&real[real.len() - DATA_FOOTER + 8..]) as usize;
        for claim in CLAIMS {
            for replace in [true, false] {
                for at in 0..header.len() {
                    let bytes = parts.assemble_with(&claimed(&header, at, claim, replace));
                    run(&bytes, bytes.len() as u64, &mut cases);
                }
                for at in 0..index_len {
                    let bytes =
                        parts.assemble_raw(&header, |index| claimed(&index, at, claim, replace));
                    run(&bytes, bytes.len() as u64, &mut cases);
                }
            }
        }
    }
    // Every byte of the header, index and footer of both files, set to five values, with
    // the CRCs repaired.
    for (real, _) in &reals {
        let footer = real.len() - DATA_FOOTER;
        let index_offset = be64(&real[footer..]) as usize;
        let header_end = 16 + be32(&real[12..]) as usize + 4;
        for at in (0..header_end).chain(index_offset..real.len()) {
            for value in [0x00, 0x01, 0x7f, 0xfc, 0xff] {
                let mut bytes = real.clone();
                bytes[at] = value;
                repair_crcs(&mut bytes);
                run(&bytes, bytes.len() as u64, &mut cases);
            }
        }
    }
    eprintln!("reader: {cases} cases, {read} read through, {errors} errors ({deep} in sections)");
    assert!(cases >= READER_CASES + 4_000, "{cases}");
    assert!(read > 0 && deep > 0);
}

/// `meta` with subtask 0's canonical data file recorded as `bytes`.
fn with_data_file(meta: &CheckpointMetadata, bytes: &[u8]) -> Vec<u8> {
    let mut meta = meta.clone();
    let op = meta.operators.iter_mut().find(|o| o.uid == UID).unwrap();
    let Some(KeyedSnapshot::Canonical(h)) = &mut op.subtasks[0].keyed else {
        panic!("not a canonical savepoint");
    };
    h.file.size = bytes.len() as u64;
    h.file.crc32 = crc32fast::hash(bytes);
    meta.encode().unwrap()
}

const RESTORE_CASES: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canonical_restore_survives_hostile_files() {
    let f = fixture(1).await;
    let folder = f.plain_folder.clone();
    let (rel, real) = Fixture::data_file(&folder, &f.plain);
    let meta = Fixture::decoded(&f.plain);
    let memory = CheckpointStorage::open("memory://hostile-restore").unwrap();
    let parts = DataParts::of(&real, &memory, "real/state.rkss").await;
    let mut rng = Rng::new(0x7265_7374_0004);
    let (mut restored, mut failed, mut read_errors) = (0u64, 0u64, 0u64);
    for case in 0..RESTORE_CASES {
        let bytes = if case % 4 == 0 {
            hostile_data_file(&mut rng, &real, &parts)
        } else {
            semantic_mutation(&mut rng, &parts)
        };
        std::fs::write(local(&folder).join(&rel), &bytes).unwrap();
        std::fs::write(
            local(&folder).join("_metadata"),
            with_data_file(&meta, &bytes),
        )
        .unwrap();
        let source = RestoreSource::open_folder(&folder).await.unwrap();
        let report = source.verify(|_| {}).await.unwrap();
        assert!(report.is_sound(), "{:?}", report.bad);

        let p = 1 + (case % 3 == 0) as u32;
        let subtask = (case % u64::from(p)) as u32;
        let dir = f.root().join(format!("restored-{case}"));
        let options = BackendOptions::for_subtask(&dir, subtask, p, MAX_PAR).unwrap();
        let result = RocksStateBackend::builder(options)
            .restore_operator(&source, UID, &RestoreOptions::default())
            .await;
        match result {
            Ok(backend) => {
                restored += 1;
                for e in read_back(&backend, subtask, p) {
                    assert!(is_typed(e.kind()), "case {case}: {:?}: {e}", e.kind());
                    read_errors += 1;
                }
                backend.close().unwrap();
            }
            Err(e) => {
                failed += 1;
                assert!(is_typed(e.kind()), "case {case}: {:?}: {e}", e.kind());
                // Nothing is left behind.
                assert!(
                    !dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(),
                    "case {case}: {e}"
                );
                assert!(!f.root().join(format!("restored-{case}.restoring")).exists());
            }
        }
    }
    eprintln!("restore: {restored} restored ({read_errors} read errors), {failed} failed");
    assert!(restored > 0 && failed > 0);
}

// ---------------------------------------------------------------------------------------
// 1b. Allocation proportional to the input.

/// `bytes` with the first one-byte length prefix of `text` replaced by a claim of 512 MiB.
fn claim_512_mib(bytes: &[u8], text: &str) -> Vec<u8> {
    let mut needle = vec![text.len() as u8];
    needle.extend_from_slice(text.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no {text:?} in the encoding"));
    let mut out = bytes.to_vec();
    out.splice(at..at + 1, [0xfc, 0x20, 0x00, 0x00, 0x00]);
    out
}

/// A string whose length claim is below the codec's 1 GiB limit but far beyond the input
/// is allocated in full before the decoder finds the input too short (bincode 2 decodes
/// an owned `String` as `vec![0u8; len]`, then reads). The decode fails with `Corrupt`,
/// but about a kilobyte makes it allocate 512 MiB: enough to abort a process under a
/// memory limit (`ulimit -v`, strict overcommit), and without any CRC in the way for a
/// state handle received from a runtime's channel.
#[test]
fn string_length_claims_allocate_no_more_than_the_input_justifies() {
    let f = runtime().block_on(fixture(1));
    let mut failures = Vec::new();

    // `_metadata`: the job id of a real checkpoint (the frame repaired: a hostile writer
    // computes the CRC too).
    let seeds = metadata_seeds(&f);
    let (version, payload) = metadata_payload(&seeds[0]);
    let bytes = frame_metadata(version, &claim_512_mib(payload, "job"));
    let (result, largest, _) = measured(|| CheckpointMetadata::decode(&bytes, "hostile"));
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Corrupt);
    if largest > justified(bytes.len()) {
        failures.push(format!(
            "_metadata of {} bytes: {largest} bytes allocated",
            bytes.len()
        ));
    }

    // A state handle: its backend uid.
    let seed = handle_seed(&f);
    let bytes = claim_512_mib(&seed.encode().unwrap(), &seed.backend_uid);
    let (result, largest, _) = measured(|| KeyedStateHandle::decode(&bytes));
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Corrupt);
    if largest > justified(bytes.len()) {
        failures.push(format!(
            "state handle of {} bytes: {largest} bytes allocated",
            bytes.len()
        ));
    }

    // A data file: the name of its first state, header CRC correct.
    let (_, real) = Fixture::data_file(&f.plain_folder, &f.plain);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = CheckpointStorage::open("memory://hostile-claims").unwrap();
    let parts = rt.block_on(DataParts::of(&real, &store, "real/state.rkss"));
    let payload = rockstate::codec::encode_key(&parts.header).unwrap();
    let name = parts.header.states[0].name.clone();
    let bytes = parts.assemble_with(&claim_512_mib(&payload, &name));
    rt.block_on(store.put_if_absent("claim/state.rkss", Bytes::from(bytes.clone())))
        .unwrap();
    let (result, largest, _) = measured(|| {
        rt.block_on(DataFileReader::open(
            &store,
            "claim/state.rkss",
            bytes.len() as u64,
        ))
    });
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Corrupt);
    if largest > justified(bytes.len()) {
        failures.push(format!(
            "data file of {} bytes: {largest} bytes allocated",
            bytes.len()
        ));
    }

    // And what the length-claim sweep finds once claims misalign the rest of the input.
    let strict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        length_claim_sweep(&f, justified)
    }));
    if strict.is_err() {
        failures.push("the length-claim sweep, with the input-proportional bound".into());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
