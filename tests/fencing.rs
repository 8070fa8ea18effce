//! Two writers on one job directory: a stale or duplicate process of the same job keeps
//! running beside the one that took over. Only one writer may commit or delete: the one
//! started last fences the older one before its next commit or delete.

use std::collections::BTreeSet;
use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::ObjectStore;
use rockstate::testing::{GatedStore, Op};
use rockstate::{
    AckOutcome, BackendOptions, CheckpointCoordinator, CheckpointMetadata, CheckpointStorage,
    CoordinatorOptions, ErrorKind, OperatorSpec, RocksStateBackend, SubtaskSnapshot, ValueState,
    ValueStateDescriptor,
};

const UID: &str = "counter";
const MAX_PAR: u32 = 16;

fn spec() -> Vec<OperatorSpec> {
    vec![OperatorSpec {
        uid: UID.into(),
        parallelism: 1,
        max_parallelism: MAX_PAR,
    }]
}

struct Subtask {
    backend: RocksStateBackend,
    state: ValueState<u64, u64>,
}

fn subtask(dir: &std::path::Path) -> Subtask {
    let options = BackendOptions::for_subtask(dir, 0, 1, MAX_PAR).unwrap();
    let backend = RocksStateBackend::open(options).unwrap();
    let state = backend
        .register(ValueStateDescriptor::<u64, u64>::new("v"))
        .unwrap();
    Subtask { backend, state }
}

fn write(s: &Subtask, from: u64, n: u64, value: u64) {
    for k in from..from + n {
        s.state.put(&k, &value).unwrap();
    }
    s.backend.flush().unwrap();
}

async fn snapshot(s: &Subtask, job: &CheckpointStorage, id: u64) -> SubtaskSnapshot {
    rockstate::testing::fixtures::snapshot_subtask(&s.backend, job, UID, 0, id).await
}

async fn checkpoint(
    coord: &mut CheckpointCoordinator,
    s: &Subtask,
    job: &CheckpointStorage,
) -> CheckpointMetadata {
    rockstate::testing::fixtures::checkpoint_once(coord, job, UID, std::slice::from_ref(&s.backend))
        .await
}

async fn assert_whole(job: &CheckpointStorage, when: &str) {
    let stored: BTreeSet<String> = job
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect();
    for meta in job.checkpoints().await.unwrap().completed {
        for path in meta.referenced_paths() {
            assert!(
                stored.contains(path),
                "{when}: checkpoint {} references missing {path}",
                meta.checkpoint_id
            );
        }
    }
}

/// Coordinator A runs the job and is in the middle of checkpoint 2 (its subtask has
/// uploaded) when coordinator B of the same job starts on the same directory (a duplicate
/// process, or a restart while the old one still runs) and completes a checkpoint of its
/// own. A's acknowledgement then arrives; A gives up on the checkpoint and shuts down
/// discarding its checkpoints.
///
/// Proves: the older writer is fenced at its next commit with `ErrorKind::Fenced`, and
/// never deletes anything once the newer one started; the newer writer's checkpoints
/// stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_of_two_writers_is_fenced() {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store_a = Arc::new(GatedStore::new(inner.clone()));
    let store_b = Arc::new(GatedStore::new(inner.clone()));
    let job_a = CheckpointStorage::from_store(store_a.clone(), "gated://a")
        .child("job")
        .unwrap();
    let job_b = CheckpointStorage::from_store(store_b.clone(), "gated://b")
        .child("job")
        .unwrap();
    let plain = CheckpointStorage::from_store(inner, "memory://plain")
        .child("job")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sa = subtask(&dir.path().join("a"));
    let sb = subtask(&dir.path().join("b"));

    let mut a =
        CheckpointCoordinator::start(job_a.clone(), "job", spec(), CoordinatorOptions::default())
            .await
            .unwrap();
    write(&sa, 0, 300, 1);
    checkpoint(&mut a, &sa, &job_a).await;
    write(&sa, 10, 30, 2);
    let id = a.trigger().unwrap();
    let snap = snapshot(&sa, &job_a, id).await;

    let mut b =
        CheckpointCoordinator::start(job_b.clone(), "job", spec(), CoordinatorOptions::default())
            .await
            .unwrap();
    store_a.clear_requests();
    write(&sb, 0, 300, 3);
    let b1 = checkpoint(&mut b, &sb, &job_b).await;

    let outcome = a.acknowledge(id, UID, 0, snap).await;
    match &outcome {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Fenced, "{e}"),
        Ok(AckOutcome::Completed(_)) => {
            panic!("the older writer committed checkpoint {id} beside a newer one")
        }
        Ok(other) => panic!("the older writer was not fenced at its commit: {other:?}"),
    }
    let _ = a.decline(id, "fenced").await;
    let _ = a.shutdown(true).await;
    let deletes: Vec<_> = store_a
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Delete)
        .collect();
    assert!(
        deletes.is_empty(),
        "the older writer deleted after the newer one started: {deletes:?}"
    );
    assert_whole(&plain, "after the older writer gave up").await;
    assert_eq!(
        plain
            .latest_completed()
            .await
            .unwrap()
            .map(|m| m.checkpoint_id),
        Some(b1.checkpoint_id)
    );
    write(&sb, 40, 30, 4);
    checkpoint(&mut b, &sb, &job_b).await;
    assert_whole(&plain, "after the newer writer's next checkpoint").await;
}

/// Two coordinators of one job directory (an old process still polling, and the one that
/// took over), two control requests at once, and a client that gives up.
///
/// Proves: the fenced writer can neither take nor answer a request (both fail with
/// `Fenced` and write nothing); the current writer takes and answers both requests (a
/// taken request is no longer offered), each client gets its own answer, a second answer
/// changes nothing; a request its client
/// withdrew, or one past its deadline, is never taken; nothing is left in `_control/`
/// but the withdrawn request's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_requests_are_answered_once_and_never_by_a_fenced_writer() {
    use rockstate::runtime::control::{self, Answer, Command, Outcome};
    use std::time::Duration;

    let job = CheckpointStorage::open("memory://control")
        .unwrap()
        .child("job")
        .unwrap();
    let mut old =
        CheckpointCoordinator::start(job.clone(), "job", spec(), CoordinatorOptions::default())
            .await
            .unwrap();
    let mut current =
        CheckpointCoordinator::start(job.clone(), "job", spec(), CoordinatorOptions::default())
            .await
            .unwrap();
    let savepoint = Command::Savepoint {
        dir: None,
        format: rockstate::SavepointFormat::Canonical,
    };
    let minute = Duration::from_secs(60);
    let first = control::submit(&job, savepoint.clone(), minute)
        .await
        .unwrap();
    let second = control::submit(&job, savepoint.clone(), minute)
        .await
        .unwrap();
    assert_ne!(first, second);
    let pending = control::pending(&job).await.unwrap();
    let ids: BTreeSet<&str> = pending.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from([first.as_str(), second.as_str()]));

    let err = control::accept(&mut old, &pending[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let stale = Answer::Savepoint {
        url: "memory://stale".into(),
    };
    let err = control::answer(&mut old, &first, &stale).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    assert_eq!(
        control::pending(&job).await.unwrap().len(),
        2,
        "the fenced writer took one"
    );

    let url_of = |id: &str| {
        if id == first {
            "memory://one"
        } else {
            "memory://two"
        }
    };
    for request in &pending {
        let url = url_of(&request.id);
        assert!(control::accept(&mut current, request).await.unwrap());
        // Taken: no longer offered.
        assert!(control::pending(&job)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != request.id));
        let answer = Answer::Savepoint { url: url.into() };
        control::answer(&mut current, &request.id, &answer)
            .await
            .unwrap();
        let again = Answer::Savepoint {
            url: "memory://again".into(),
        };
        control::answer(&mut current, &request.id, &again)
            .await
            .unwrap();
    }
    assert!(control::pending(&job).await.unwrap().is_empty());
    let poll = Duration::from_millis(10);
    for (id, url) in [(&first, "memory://one"), (&second, "memory://two")] {
        let got = control::wait_for_answer(&job, id, Duration::from_secs(5), poll)
            .await
            .unwrap();
        assert_eq!(
            got,
            Outcome::Answered(Answer::Savepoint { url: url.into() })
        );
    }
    assert!(job.list("_control").await.unwrap().is_empty());

    // A client that gives up withdraws its request: a job that listed it before cannot
    // take it afterwards.
    let third = control::submit(&job, savepoint.clone(), minute)
        .await
        .unwrap();
    let listed = control::pending(&job).await.unwrap();
    assert_eq!(listed.len(), 1);
    let gave_up = control::wait_for_answer(&job, &third, Duration::ZERO, poll)
        .await
        .unwrap();
    assert_eq!(gave_up, Outcome::Withdrawn);
    assert!(!control::accept(&mut current, &listed[0]).await.unwrap());
    assert!(control::pending(&job).await.unwrap().is_empty());

    // A request past its deadline (its client is gone) is withdrawn, not taken.
    control::submit(&job, savepoint, Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let expired = control::pending(&job).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert!(!control::accept(&mut current, &expired[0]).await.unwrap());
    assert!(control::pending(&job).await.unwrap().is_empty());
}
