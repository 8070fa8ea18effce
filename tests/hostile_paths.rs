//! Nothing read from storage makes rockstate touch files outside a snapshot's root: hostile
//! paths in `_metadata` and handles, and symbolic links inside the root.
//!
//! The hostile metadata are real snapshots (a checkpoint and savepoints taken by real
//! backends) with their recorded paths rewritten.
//!
//! What each test proves:
//! - `hostile_paths_are_refused_by_every_consumer`: file paths that escape the root or are
//!   not normalised, in `_metadata` on disk and in metadata handed over in memory, through
//!   open, verify, restore, the orphan sweep, coordinator recovery, acknowledgements,
//!   abort, discard and `dispose_savepoint`: refused with a typed error or treated as plain
//!   names inside the root; sentinel files outside the root are never read, deleted or
//!   modified.
//! - `file_symlinks_are_never_followed`: checkpoint and savepoint files that are symlinks
//!   to files outside the root are refused by verify and restore (typed errors), skipped
//!   by listings, and never deleted through by the sweep, discard or dispose.
//! - `sweep_never_deletes_through_a_directory_symlink`,
//!   `discard_never_deletes_through_a_directory_symlink`,
//!   `dispose_never_deletes_through_a_directory_symlink`: a directory symlink inside the
//!   root never leads a deletion outside it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::snapshots::*;
use rockstate::checkpoint::{
    sweep, AckOutcome, CheckpointCoordinator, CoordinatorOptions, SweepOptions,
};
use rockstate::savepoint::dispose_savepoint;
use rockstate::{
    BackendOptions, CheckpointMetadata, ErrorKind, KeyedSnapshot, RestoreOptions, RestoreSource,
    RocksStateBackend, SubtaskSnapshot,
};

// ---------------------------------------------------------------------------------------
// 2. Hostile paths.

/// The content of every sentinel: size and CRC32 are recorded for hostile entries, so a
/// consumer that followed an escaping path would find exactly what it expects.
const SENTINEL: &[u8] = b"sentinel outside the root: never read, deleted or modified\n";

/// A file outside every root.
struct Sentinel {
    path: PathBuf,
    content: Vec<u8>,
    modified: SystemTime,
}

impl Sentinel {
    fn plant(path: PathBuf) -> Self {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, SENTINEL).unwrap();
        Self::existing(path)
    }

    fn existing(path: PathBuf) -> Self {
        let content = std::fs::read(&path).unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        Self {
            path,
            content,
            modified,
        }
    }

    /// What happened to the file, if anything.
    fn damage(&self) -> Option<String> {
        let path = self.path.display();
        match std::fs::read(&self.path) {
            Err(e) => Some(format!("{path} is gone ({e})")),
            Ok(content) if content != self.content => Some(format!("{path} was modified")),
            Ok(_) => {
                let modified = std::fs::metadata(&self.path).unwrap().modified().unwrap();
                (modified != self.modified).then(|| format!("{path} was touched"))
            }
        }
    }
}

fn assert_all_intact(sentinels: &[Sentinel], after: &str) {
    let damaged: Vec<String> = sentinels.iter().filter_map(Sentinel::damage).collect();
    assert!(damaged.is_empty(), "after {after}: {damaged:#?}");
}

/// Relative paths that escape their root or are not normalised, and names that only look
/// dangerous (`%2e%2e`, `~`, full-width dots: plain names inside the root). An absolute
/// path names a sentinel (never a system file: some consumers delete what they find).
fn hostile_paths(root: &Path) -> Vec<String> {
    let mut paths: Vec<String> = [
        "../x",
        "../../x",
        "../../outside",
        "a/../../x",
        "shared/../../outside",
        "shared/../../../outside",
        "shared/./x",
        "./shared/x",
        "shared//x",
        "shared/x/..",
        "shared/",
        "/",
        "",
        ".",
        "..",
        "shared\\..\\..\\outside",
        "..\\..\\outside",
        "C:\\x",
        "shared/x\0.sst",
        "shared/\n",
        "shared/x\r",
        "%2e%2e/x",
        "shared/%2e%2e/%2e%2e/outside",
        "shared/%2E%2E%2F%2E%2E%2Foutside",
        "~/outside",
        "shared/\u{ff0e}\u{ff0e}/x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    paths.push(format!("{}/outside", root.display()));
    paths.push(format!("file://{}/outside", root.display()));
    paths.push(format!("shared/{}", "a".repeat(300)));
    paths.push(format!("shared/{}x", "ab/".repeat(400)));
    paths
}

/// `meta` with every file of `UID`'s subtask 0 (or only the first shared or private file)
/// at `path`, recorded with the sentinel's size and CRC32.
fn with_hostile_path(meta: &CheckpointMetadata, path: &str, which: Which) -> CheckpointMetadata {
    let mut meta = meta.clone();
    let op = meta.operators.iter_mut().find(|o| o.uid == UID).unwrap();
    let hostile = |f: &mut rockstate::StateFile| {
        f.path = path.to_string();
        f.size = SENTINEL.len() as u64;
        f.crc32 = crc32fast::hash(SENTINEL);
    };
    match op.subtasks[0].keyed.as_mut().unwrap() {
        KeyedSnapshot::Files(h) => match which {
            Which::Shared => hostile(&mut h.shared[0]),
            Which::Private => hostile(&mut h.private[0]),
            Which::All => h.shared.iter_mut().chain(&mut h.private).for_each(hostile),
        },
        KeyedSnapshot::Canonical(h) => hostile(&mut h.file),
    }
    meta
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Shared,
    Private,
    All,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn restore_p1(source: &RestoreSource, dir: &Path) -> rockstate::Result<RocksStateBackend> {
    let options = BackendOptions::for_subtask(dir, 0, 1, MAX_PAR).unwrap();
    RocksStateBackend::builder(options)
        .restore_operator(source, UID, &RestoreOptions::default())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_refused_by_every_consumer() {
    let f = fixture(1).await;
    let root = f.root().to_path_buf();
    let job_dir = local(&f.job);
    assert_eq!(job_dir, root.join("store/job"));
    // Where the escaping paths lead from the job directory and from a savepoint folder.
    let sentinels: Vec<Sentinel> = [
        "outside",
        "x",
        "store/x",
        "store/outside",
        "store/savepoints/x",
    ]
    .iter()
    .map(|p| Sentinel::plant(root.join(p)))
    .collect();
    let checkpoint = Fixture::decoded(&f.checkpoint);
    let canonical = Fixture::decoded(&f.plain);
    let paths = hostile_paths(&root);
    let mut refused = 0;

    for (k, path) in paths.iter().enumerate() {
        let inside = is_inside_root(path);
        let what = format!("path {path:?}");

        // Bypassing the decoder: metadata handed over in memory, every file of the
        // subtask at the hostile path. Nothing is read from it, restore fails.
        let meta = with_hostile_path(&checkpoint, path, Which::All);
        let source = RestoreSource::checkpoint(&f.job, meta.clone());
        let read = AtomicU64::new(0);
        let report = source
            .verify(|n| {
                read.fetch_add(n, Ordering::SeqCst);
            })
            .await
            .unwrap();
        assert_eq!(read.load(Ordering::SeqCst), 0, "{what}: bytes were read");
        assert_eq!(report.bad.len(), 1, "{what}: {:?}", report.bad);
        assert!(
            is_typed(report.bad[0].error.kind()),
            "{what}: {:?}",
            report.bad
        );
        let dir = root.join(format!("restored-{k}"));
        let err = restore_p1(&source, &dir).await.unwrap_err();
        assert!(is_typed(err.kind()), "{what}: {:?}: {err}", err.kind());
        let handle = meta.handles().next().unwrap().1.clone();
        let options = BackendOptions::for_subtask(&dir, 0, 1, MAX_PAR).unwrap();
        let err = RocksStateBackend::restore(options, &handle, &f.job)
            .await
            .unwrap_err();
        assert!(is_typed(err.kind()), "{what}: {:?}: {err}", err.kind());
        assert!(
            !dir.exists(),
            "{what}: a failed restore left {}",
            dir.display()
        );
        if !inside {
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
            assert_eq!(handle.validate().unwrap_err().kind(), ErrorKind::Corrupt);
        }

        // Written as the `_metadata` of a checkpoint folder: refused when read, or (for
        // names that only look dangerous) a checkpoint whose file is missing.
        let which = if k % 2 == 0 {
            Which::Shared
        } else {
            Which::Private
        };
        // A plain path of at most 1024 bytes, and under `shared/` for a shared file.
        let acceptable = inside
            && path.len() <= 1024
            && (matches!(which, Which::Private) || path.starts_with("shared/"));
        let mut meta = with_hostile_path(&checkpoint, path, which);
        meta.checkpoint_id = 100 + k as u64;
        let folder = job_dir.join(format!("chk-{}", meta.checkpoint_id));
        std::fs::create_dir_all(&folder).unwrap();
        let bytes = meta.encode().unwrap();
        std::fs::write(folder.join("_metadata"), &bytes).unwrap();
        match RestoreSource::open(folder.to_str().unwrap()).await {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
                assert!(!acceptable, "{what}: refused a plain path: {e}");
                refused += 1;
            }
            Ok(source) => {
                assert!(acceptable, "{what}: accepted");
                let report = source.verify(|_| {}).await.unwrap();
                assert_eq!(report.bad.len(), 1, "{what}");
                assert_eq!(report.bad[0].error.kind(), ErrorKind::NotFound, "{what}");
                let err = restore_p1(&source, &root.join(format!("restored-{k}")))
                    .await
                    .unwrap_err();
                assert_eq!(err.kind(), ErrorKind::NotFound, "{what}: {err}");
            }
        }

        // The same for a canonical savepoint folder, which `dispose_savepoint` then
        // refuses (nothing deleted) or empties (nothing outside touched).
        let meta = with_hostile_path(&canonical, path, Which::All);
        let sp = f
            .savepoints
            .child(&format!("savepoint-hostile-{k}"))
            .unwrap();
        std::fs::create_dir_all(local(&sp).join("keep")).unwrap();
        std::fs::write(local(&sp).join("_metadata"), meta.encode().unwrap()).unwrap();
        std::fs::write(local(&sp).join("keep/me"), b"mine").unwrap();
        match RestoreSource::open_folder(&sp).await {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "savepoint {what}: {e}");
                let err = dispose_savepoint(&sp).await.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Corrupt, "savepoint {what}: {err}");
                assert!(local(&sp).join("_metadata").exists());
                assert!(local(&sp).join("keep/me").exists());
            }
            Ok(source) => {
                assert!(inside && path.len() <= 1024, "savepoint {what}: accepted");
                let err = restore_p1(&source, &root.join(format!("restored-sp-{k}")))
                    .await
                    .unwrap_err();
                assert_eq!(err.kind(), ErrorKind::NotFound, "savepoint {what}: {err}");
                dispose_savepoint(&sp).await.unwrap();
                assert!(sp.list("").await.unwrap().is_empty());
            }
        }
        assert_all_intact(&sentinels, &format!("open, verify and restore of {what}"));
    }
    assert!(
        refused >= paths.len() - 5,
        "{refused} of {} refused",
        paths.len()
    );

    // A canonical data file's local name is never used as a path: a hostile one changes
    // nothing (the file is read where its path says).
    let mut meta = canonical.clone();
    for op in &mut meta.operators {
        for s in &mut op.subtasks {
            if let Some(KeyedSnapshot::Canonical(h)) = &mut s.keyed {
                h.file.local_name = "../../../x".into();
            }
        }
    }
    std::fs::write(
        local(&f.plain_folder).join("_metadata"),
        meta.encode().unwrap(),
    )
    .unwrap();
    let source = RestoreSource::open_folder(&f.plain_folder).await.unwrap();
    let backend = restore_p1(&source, &root.join("restored-local-name"))
        .await
        .unwrap();
    assert!(read_back(&backend, 0, 1).is_empty());
    backend.close().unwrap();
    assert_all_intact(&sentinels, "a restore with a hostile local name");

    // The orphan sweep: damaged checkpoints make it keep every shared file; the real
    // checkpoint stays whole.
    let report = sweep(
        &f.job,
        &SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
        now_ms() + 60_000,
    )
    .await
    .unwrap();
    assert_eq!(report.unreadable.len(), refused, "{report:?}");
    assert_all_intact(&sentinels, "the orphan sweep");
    let real = RestoreSource::open(
        job_dir
            .join(format!("chk-{}", f.checkpoint_id))
            .to_str()
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(real.verify(|_| {}).await.unwrap().is_sound());

    // The coordinator: recovery retains the newest readable checkpoint and subsumes the
    // others; acknowledgements with hostile handles are refused; discarding everything
    // on shutdown deletes nothing outside.
    let mut coordinator = CheckpointCoordinator::start(
        f.job.clone(),
        "job",
        specs(1),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap();
    assert_all_intact(&sentinels, "coordinator recovery");
    let mut id = coordinator.trigger().unwrap();
    let mut accepted = 0;
    for (k, path) in paths.iter().enumerate() {
        let which = if k % 2 == 0 {
            Which::Private
        } else {
            Which::All
        };
        let meta = with_hostile_path(&checkpoint, path, which);
        let ack = |id: u64| {
            let mut handle = meta.handles().next().unwrap().1.clone();
            handle.checkpoint_id = id;
            for file in handle.private.iter_mut() {
                file.uploaded_by = id;
            }
            SubtaskSnapshot {
                keyed: Some(handle.into()),
                ..Default::default()
            }
        };
        // A late acknowledgement (no such pending checkpoint) is checked the same way.
        let late = coordinator
            .acknowledge(id + 1_000, UID, 0, ack(id + 1_000))
            .await;
        let ack = ack(id);
        match coordinator.acknowledge(id, UID, 0, ack).await {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "ack of {path:?}: {e}");
                assert_eq!(late.unwrap_err().kind(), ErrorKind::Corrupt);
            }
            Ok(outcome) => {
                assert!(is_inside_root(path), "ack of {path:?} accepted");
                assert!(matches!(outcome, AckOutcome::Pending));
                assert!(matches!(late, Ok(AckOutcome::Discarded)));
                // Aborting deletes what the subtask claims to have written, in the root.
                coordinator.decline(id, "hostile").await.unwrap();
                id = coordinator.trigger().unwrap();
                accepted += 1;
            }
        }
    }
    assert!(
        (1..=5).contains(&accepted),
        "{accepted} hostile acknowledgements accepted"
    );
    assert_all_intact(&sentinels, "hostile acknowledgements");
    coordinator.shutdown(true).await.unwrap();
    assert_all_intact(&sentinels, "coordinator shutdown with discard");
}

// ---------------------------------------------------------------------------------------
// 3. Symlinks inside the root.

fn no_grace() -> SweepOptions {
    SweepOptions {
        grace: Duration::ZERO,
        dry_run: false,
    }
}

/// Moves `inside` to `outside` and leaves a symlink to it in its place.
#[cfg(unix)]
fn move_out_and_link(inside: &Path, outside: &Path) -> Sentinel {
    std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
    std::fs::rename(inside, outside).unwrap();
    std::os::unix::fs::symlink(outside, inside).unwrap();
    Sentinel::existing(outside.to_path_buf())
}

/// Every file of the checkpoint and the canonical savepoint is a symlink to a file outside
/// the store, with the recorded size and CRC32 (the same bytes). Reading through them is
/// accepted: the content is what the metadata recorded. Deleting removes only the links.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_symlinks_are_never_followed() {
    let f = fixture(1).await;
    let root = f.root().to_path_buf();
    let job_dir = local(&f.job);
    let outside = root.join("outside");
    let checkpoint = Fixture::decoded(&f.checkpoint);
    let mut targets = Vec::new();
    for (_, h) in checkpoint.handles() {
        for file in h.files() {
            let name = file.path.replace('/', "_");
            targets.push(move_out_and_link(
                &job_dir.join(&file.path),
                &outside.join(name),
            ));
        }
    }
    assert!(targets.len() >= 4);
    // An orphan shared file and a file of an incomplete checkpoint, both links too.
    for (rel, name) in [("shared/orphan.sst", "orphan"), ("chk-9/0/x", "incomplete")] {
        let target = Sentinel::plant(outside.join(name));
        std::fs::create_dir_all(job_dir.join(rel).parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target.path, job_dir.join(rel)).unwrap();
        targets.push(target);
    }
    let (data_rel, _) = Fixture::data_file(&f.plain_folder, &f.plain);
    targets.push(move_out_and_link(
        &local(&f.plain_folder).join(&data_rel),
        &outside.join("savepoint.rkss"),
    ));

    // Verify and restore refuse to read through the links.
    let chk = job_dir.join(format!("chk-{}", f.checkpoint_id));
    let source = RestoreSource::open(chk.to_str().unwrap()).await.unwrap();
    let report = source.verify(|_| {}).await.unwrap();
    assert!(!report.is_sound());
    assert!(report
        .bad
        .iter()
        .all(|b| b.error.kind() == rockstate::ErrorKind::InvalidArgument));
    let restored = restore_p1(&source, &root.join("restored-checkpoint")).await;
    assert!(restored.is_err());
    let savepoint = RestoreSource::open_folder(&f.plain_folder).await.unwrap();
    let restored = restore_p1(&savepoint, &root.join("restored-savepoint")).await;
    assert!(restored.is_err());
    assert_all_intact(&targets, "verify and restore");

    // The sweep does not see objects behind links, and deletes nothing through them.
    let report = sweep(&f.job, &no_grace(), now_ms() + 60_000).await.unwrap();
    assert!(
        report
            .orphans
            .iter()
            .all(|o| o.path != "shared/orphan.sst" && o.path != "chk-9/0/x"),
        "{report:?}"
    );
    assert_all_intact(&targets, "the orphan sweep");

    // Discarding every checkpoint refuses to delete through the links.
    let mut coordinator = CheckpointCoordinator::start(
        f.job.clone(),
        "job",
        specs(1),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap();
    let discarded = coordinator.shutdown(true).await;
    eprintln!("shutdown: {discarded:?}");
    assert_all_intact(&targets, "coordinator shutdown with discard");

    // Disposing of the savepoint does not delete through its link either.
    let disposed = dispose_savepoint(&f.plain_folder).await;
    eprintln!("dispose: {disposed:?}");
    assert_all_intact(&targets, "dispose_savepoint");
}

/// Plants `victim` files in a directory outside the store and links `link` to it.
#[cfg(unix)]
fn outside_dir_linked_from(link: &Path, outside: &Path) -> Vec<Sentinel> {
    let victims = ["victim", "nested/victim"]
        .iter()
        .map(|p| Sentinel::plant(outside.join(p)))
        .collect();
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(outside, link).unwrap();
    victims
}

/// `chk-7 -> <outside>`: an incomplete checkpoint folder for the sweep, whose files it
/// deletes.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_never_deletes_through_a_directory_symlink() {
    let f = fixture(1).await;
    let victims =
        outside_dir_linked_from(&local(&f.job).join("chk-7"), &f.root().join("outside-dir"));
    let report = sweep(&f.job, &no_grace(), now_ms() + 60_000).await;
    eprintln!("sweep: {report:?}");
    assert_all_intact(&victims, "the orphan sweep");
    assert!(f.root().join("outside-dir/nested").is_dir());
}

/// `chk-N -> <outside>/chk-N`, a complete checkpoint kept elsewhere (another job's, a
/// backup): the coordinator retains it, and discarding it deletes its `_metadata` and
/// private files.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_never_deletes_through_a_directory_symlink() {
    let f = fixture(1).await;
    let name = format!("chk-{}", f.checkpoint_id);
    let link = local(&f.job).join(&name);
    let elsewhere = f.root().join("elsewhere").join(&name);
    std::fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    std::fs::rename(&link, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let victims: Vec<Sentinel> = walk(&elsewhere)
        .into_iter()
        .map(Sentinel::existing)
        .collect();
    assert!(victims.len() >= 4, "{} files", victims.len());

    // Files behind the link are not the job's: verify refuses to read them.
    let source = RestoreSource::open(link.to_str().unwrap()).await.unwrap();
    let report = source.verify(|_| {}).await.unwrap();
    assert!(!report.is_sound());
    assert!(report
        .bad
        .iter()
        .all(|b| b.error.kind() == rockstate::ErrorKind::InvalidArgument));

    let mut coordinator = CheckpointCoordinator::start(
        f.job.clone(),
        "job",
        specs(1),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap();
    // A checkpoint behind a link is not the job's: it is neither retained nor discarded.
    assert_eq!(coordinator.retained().count(), 0);
    let result = coordinator.shutdown(true).await;
    eprintln!("shutdown: {result:?}");
    assert_all_intact(&victims, "coordinator shutdown with discard");
    for victim in &victims {
        assert!(victim.path.parent().unwrap().is_dir());
    }
}

/// A savepoint folder holding `extra -> <outside>`: disposing of the savepoint deletes
/// every object listed in the folder.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispose_never_deletes_through_a_directory_symlink() {
    let f = fixture(1).await;
    let victims = outside_dir_linked_from(
        &local(&f.plain_folder).join("extra"),
        &f.root().join("outside-dir"),
    );
    let result = dispose_savepoint(&f.plain_folder).await;
    eprintln!("dispose: {result:?}");
    assert_all_intact(&victims, "dispose_savepoint");
    // Emptied directories are removed up to the root, but never outside it.
    assert!(f.root().join("outside-dir/nested").is_dir());
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
