//! Golden vectors: key-group hashing and key encoding are frozen formats.
//!
//! The expected values live in `fixtures/`. After a deliberate, versioned format change,
//! regenerate them with `ROCKSTATE_BLESS=1 cargo nextest run golden`, and review the diff.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;

use common::*;
use rockstate::keygroup::{key_group_for_bytes, murmur3_32};
use rockstate::{codec, ManualClock, MapStateDescriptor, ValueStateDescriptor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn check_or_bless(name: &str, actual: &str) {
    let path = fixture(name);
    if std::env::var_os("ROCKSTATE_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for (i, (want, got)) in expected.lines().zip(actual.lines()).enumerate() {
        assert_eq!(got, want, "{name} line {}", i + 1);
    }
    assert_eq!(
        expected.lines().count(),
        actual.lines().count(),
        "{name}: line count"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn vector_line(out: &mut String, ty: &str, shown: &str, encoded: Vec<u8>) {
    writeln!(
        out,
        "{ty}\t{shown}\t{}\t{:08x}\t{}\t{}\t{}",
        hex(&encoded),
        murmur3_32(&encoded, 0),
        key_group_for_bytes(&encoded, 1),
        key_group_for_bytes(&encoded, 128),
        key_group_for_bytes(&encoded, 32_768),
    )
    .unwrap();
}

#[test]
fn key_group_vectors() {
    let mut out = String::from(
        "# type\tvalue\tserialized key (hex)\tmurmur3_x86_32 seed 0\tkg@1\tkg@128\tkg@32768\n",
    );
    for s in ["", "a", "hello", "user-42", "ключ", &"x".repeat(300)] {
        let shown = if s.len() > 20 {
            format!("\"x\" x {}", s.len())
        } else {
            format!("{s:?}")
        };
        vector_line(&mut out, "String", &shown, codec::encode_key(s).unwrap());
    }
    for n in [0u64, 1, 250, 251, 65_535, 65_536, u64::MAX] {
        vector_line(
            &mut out,
            "u64",
            &n.to_string(),
            codec::encode_key(&n).unwrap(),
        );
    }
    for n in [0i32, -1, i32::MIN, i32::MAX] {
        vector_line(
            &mut out,
            "i32",
            &n.to_string(),
            codec::encode_key(&n).unwrap(),
        );
    }
    let tuple = ("order".to_string(), 7u32);
    vector_line(
        &mut out,
        "(String, u32)",
        "(\"order\", 7)",
        codec::encode_key(&tuple).unwrap(),
    );
    let bytes: Vec<u8> = vec![0, 1, 2, 255];
    vector_line(
        &mut out,
        "Vec<u8>",
        "[0, 1, 2, 255]",
        codec::encode_key(&bytes).unwrap(),
    );
    check_or_bless("keygroup_vectors.txt", &out);
}

#[test]
fn key_encoding_vectors() {
    let mut out = String::from(
        "# case\tRocksDB key (hex): key group u16 BE | key | namespace [| user key]\n",
    );
    let mut line = |case: &str, bytes: Vec<u8>| writeln!(out, "{case}\t{}", hex(&bytes)).unwrap();
    line(
        "value \"user-42\" ns ()",
        codec::state_key("user-42", &(), 128).unwrap(),
    );
    line(
        "value 42u64 ns ()",
        codec::state_key(&42u64, &(), 128).unwrap(),
    );
    line(
        "value \"user-42\" ns 7u64",
        codec::state_key("user-42", &7u64, 128).unwrap(),
    );
    line(
        "value \"user-42\" ns (\"w\", 3u32)",
        codec::state_key("user-42", &("w", 3u32), 32_768).unwrap(),
    );
    line(
        "map \"user-42\" ns () uk \"field\"",
        codec::map_entry_key("user-42", &(), "field", 128).unwrap(),
    );
    line(
        "map 9u32 ns \"w1\" uk 300u16",
        codec::map_entry_key(&9u32, "w1", &300u16, 128).unwrap(),
    );
    check_or_bless("key_encoding.txt", &out);
}

/// The bytes RocksDB actually holds match the documented layout.
#[test]
fn stored_keys_follow_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let key = owned_keys(1).remove(0);
    {
        let backend = open(dir.path(), &ManualClock::new(0));
        let v = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        let m = backend
            .register(MapStateDescriptor::<String, u32, u64, u8>::new("m"))
            .unwrap();
        v.put(&key, &5).unwrap();
        m.with_namespace(&3).unwrap().put(&key, &9, &10).unwrap();
    }
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir.path(), &cfs, false).unwrap();
    let read_all = |cf: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
        let cf = db.cf_handle(cf).unwrap();
        db.iterator_cf(&cf, rocksdb::IteratorMode::Start)
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    };
    assert_eq!(
        read_all("state/v"),
        vec![(
            codec::state_key(&key, &(), MAX_PAR).unwrap(),
            codec::encode_key(&5u64).unwrap()
        )]
    );
    assert_eq!(
        read_all("state/m"),
        vec![(
            codec::map_entry_key(&key, &3u8, &9u32, MAX_PAR).unwrap(),
            codec::encode_key(&10u64).unwrap()
        )]
    );
}
