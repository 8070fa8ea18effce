//! Savepoints written without a job: a bootstrap from data, and a transform of an
//! existing savepoint (keys dropped, values fixed, an operator removed and another
//! renamed), each restored at other parallelisms with every key read back.

use std::path::Path;

use rockstate::format::{OperatorState, Redistribution};
use rockstate::restore::{SavepointReader, SavepointWriter};
use rockstate::{
    BackendOptions, CheckpointStorage, ErrorKind, ListStateDescriptor, MapStateDescriptor,
    RestoreOptions, RestoreSource, RocksStateBackend, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;

/// The operator state each of `p` subtasks restores with.
fn operator_states(source: &RestoreSource, uid: &str, p: u32) -> Vec<OperatorState> {
    let old: Vec<OperatorState> = source
        .metadata()
        .operator(uid)
        .unwrap()
        .subtasks
        .iter()
        .map(|s| s.operator_state.clone())
        .collect();
    rockstate::format::redistribute(&old, p).unwrap()
}

async fn restore(source: &RestoreSource, root: &Path, uid: &str, p: u32) -> Vec<RocksStateBackend> {
    let mut out = Vec::new();
    for i in 0..p {
        let dir = root.join(format!(
            "restored-{uid}-{p}-{i}-{:x}",
            rand::random::<u32>()
        ));
        let o = BackendOptions::for_subtask(dir, i, p, MAX_PAR).unwrap();
        out.push(
            RocksStateBackend::builder(o)
                .restore_operator(source, uid, &RestoreOptions::default())
                .await
                .unwrap(),
        );
    }
    out
}

/// One million keys written by a `SavepointWriter` restore at parallelism 3, every key
/// read back from the subtask that owns it; the operator state comes along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_of_a_million_keys_restores_at_parallelism_three() {
    const KEYS: u64 = 1_000_000;
    let tmp = tempfile::tempdir().unwrap();
    let parent = CheckpointStorage::open(tmp.path().join("savepoints").to_str().unwrap()).unwrap();
    let mut writer = SavepointWriter::new(MAX_PAR, tmp.path().join("scratch")).unwrap();
    let op = writer.operator("counter").unwrap();
    let written = op
        .write_values(
            ValueStateDescriptor::<u64, u64>::new("count"),
            (0..KEYS).map(|key| (key, key * 7)),
        )
        .unwrap();
    assert_eq!(written, KEYS);
    op.write_lists(
        ListStateDescriptor::<u64, String>::new("tags"),
        (0..100u64).map(|key| (key, vec![format!("t{key}"), "x".into()])),
    )
    .unwrap();
    op.write_map_entries(
        MapStateDescriptor::<u64, u8, u64>::new("histogram"),
        (0..100u64).map(|key| (key, (key % 3) as u8, key)),
    )
    .unwrap();
    op.operator_state_mut().put(
        "offsets",
        Redistribution::Union,
        vec![b"partition-0:1000000".to_vec()],
    );
    let (folder, meta) = writer.write(&parent, "bootstrap").await.unwrap();
    assert_eq!(meta.operators.len(), 1);
    assert!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .next()
            .is_none(),
        "the writer leaves its scratch directory empty"
    );

    let source = RestoreSource::open_folder(&folder).await.unwrap();
    let backends = restore(&source, tmp.path(), "counter", 3).await;
    let mut read = 0u64;
    for b in &backends {
        let count = b
            .register(ValueStateDescriptor::<u64, u64>::new("count"))
            .unwrap();
        for key in count.all_keys().unwrap() {
            let (key, ()) = key.unwrap();
            assert_eq!(count.get(&key).unwrap(), Some(key * 7));
            read += 1;
        }
        assert_eq!(b.entries_outside_range().unwrap(), 0);
        let tags = b
            .register(ListStateDescriptor::<u64, String>::new("tags"))
            .unwrap();
        let histogram = b
            .register(MapStateDescriptor::<u64, u8, u64>::new("histogram"))
            .unwrap();
        for key in 0..100u64 {
            if b.key_group_range()
                .contains(rockstate::key_group_for(&key, MAX_PAR).unwrap())
            {
                assert_eq!(tags.get(&key).unwrap(), vec![format!("t{key}"), "x".into()]);
                assert_eq!(histogram.get(&key, &((key % 3) as u8)).unwrap(), Some(key));
            }
        }
    }
    assert_eq!(read, KEYS);
    let states = operator_states(&source, "counter", 3);
    for s in &states {
        assert_eq!(s.get("offsets"), [b"partition-0:1000000".to_vec()]);
    }
}

/// Read → filter and fix → write: a savepoint of two operators becomes one where the
/// operator `old` is gone, `counter` is renamed `counter-v2`, its keys above 50 are dropped,
/// its `count` values are fixed and its `recent` list copied raw, and its operator state
/// kept. The result restores at parallelism 1 and 4. A writer without operators, a folder
/// that already holds files, and a raw copy across max parallelisms are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_is_transformed_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = CheckpointStorage::open(tmp.path().join("savepoints").to_str().unwrap()).unwrap();
    // The original, written the same way a job would have: two operators.
    let mut writer = SavepointWriter::new(MAX_PAR, tmp.path().join("scratch")).unwrap();
    {
        let op = writer.operator("counter").unwrap();
        let count = op
            .register(ValueStateDescriptor::<String, u64>::new("count"))
            .unwrap();
        let recent = op
            .register(ListStateDescriptor::<String, u32>::new("recent"))
            .unwrap();
        for k in 0..100u32 {
            count.put(&format!("k{k}"), &u64::from(k)).unwrap();
            recent.add(&format!("k{k}"), &k).unwrap();
        }
        op.operator_state_mut().put(
            "offsets",
            Redistribution::Split,
            vec![b"a".to_vec(), b"b".to_vec()],
        );
    }
    {
        let op = writer.operator("old").unwrap();
        op.register(MapStateDescriptor::<u32, u32, u32>::new("m"))
            .unwrap()
            .put(&1, &2, &3)
            .unwrap();
    }
    assert_eq!(writer.operator_uids(), ["counter", "old"]);
    let (original, _) = writer.write(&parent, "original").await.unwrap();

    // The transform.
    let reader = SavepointReader::open(original.url(), tmp.path().join("read"))
        .await
        .unwrap();
    let keyed = reader.keyed_state("counter").await.unwrap();
    let mut writer = SavepointWriter::new(MAX_PAR, tmp.path().join("scratch")).unwrap();
    let op = writer.operator("counter-v2").unwrap();
    let copied = op
        .copy_keyed_state(&keyed, |s| s.name == "recent", |_, _, _| true)
        .unwrap();
    assert_eq!(copied, 100);
    let old_count = keyed
        .register(ValueStateDescriptor::<String, u64>::new("count"))
        .unwrap();
    let new_count = op
        .register(ValueStateDescriptor::<String, u64>::new("count"))
        .unwrap();
    for key in old_count.all_keys().unwrap() {
        let (key, ()) = key.unwrap();
        let n: u32 = key[1..].parse().unwrap();
        if n > 50 {
            continue;
        }
        let v = old_count.get(&key).unwrap().unwrap();
        new_count.put(&key, &(v + 1000)).unwrap();
    }
    drop((old_count, new_count));
    let merged = rockstate::format::redistribute(&reader.operator_states("counter").unwrap(), 1)
        .unwrap()
        .remove(0);
    *op.operator_state_mut() = merged;
    // A copy of a state already written, or from another max parallelism, is refused.
    let again = op
        .copy_keyed_state(&keyed, |s| s.name == "recent", |_, _, _| true)
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::InvalidArgument, "{again}");
    let mut other = SavepointWriter::new(64, tmp.path().join("scratch")).unwrap();
    let err = other
        .operator("x")
        .unwrap()
        .copy_keyed_state(&keyed, |_| true, |_, _, _| true)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    keyed.close().unwrap();
    let (changed, meta) = writer.write(&parent, "changed").await.unwrap();
    let uids: Vec<&str> = meta.operators.iter().map(|o| o.uid.as_str()).collect();
    assert_eq!(uids, ["counter-v2"]);

    let source = RestoreSource::open_folder(&changed).await.unwrap();
    for p in [1, 4] {
        let mut seen = 0;
        for b in restore(&source, tmp.path(), "counter-v2", p).await {
            let count = b
                .register(ValueStateDescriptor::<String, u64>::new("count"))
                .unwrap();
            let recent = b
                .register(ListStateDescriptor::<String, u32>::new("recent"))
                .unwrap();
            for k in 0..100u32 {
                let key = format!("k{k}");
                if !b
                    .key_group_range()
                    .contains(rockstate::key_group_for(&key, MAX_PAR).unwrap())
                {
                    continue;
                }
                seen += 1;
                let want = (k <= 50).then_some(u64::from(k) + 1000);
                assert_eq!(count.get(&key).unwrap(), want, "{key}");
                assert_eq!(recent.get(&key).unwrap(), vec![k]);
            }
        }
        assert_eq!(seen, 100);
        let states: Vec<OperatorState> = operator_states(&source, "counter-v2", p);
        let offsets: usize = states.iter().map(|s| s.get("offsets").len()).sum();
        assert_eq!(offsets, 2);
    }
    // The unknown old uid is refused, not restored empty.
    let o = BackendOptions::for_subtask(tmp.path().join("x"), 0, 1, MAX_PAR).unwrap();
    let err = RocksStateBackend::builder(o)
        .restore_operator(&source, "counter", &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    let empty = SavepointWriter::new(MAX_PAR, tmp.path().join("scratch")).unwrap();
    let err = empty.write(&parent, "empty").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let mut w = SavepointWriter::new(MAX_PAR, tmp.path().join("scratch")).unwrap();
    w.operator("a").unwrap();
    let err = w.write_to(&changed, "again").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(
        RestoreSource::open_folder(&changed).await.is_ok(),
        "nothing of it was removed"
    );
}
