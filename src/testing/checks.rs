//! Assertions about what a job directory holds.

use std::collections::BTreeMap;

use crate::format::CheckpointMetadata;
use crate::storage::CheckpointStorage;

/// Paths and sizes of every object under `storage`. Panics when the listing fails.
pub async fn stored(storage: &CheckpointStorage) -> BTreeMap<String, u64> {
    storage
        .list("")
        .await
        .expect("list the job directory")
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect()
}

/// Asserts that the `_metadata` of `meta` and every file it references exist in `job`
/// with the recorded sizes; `when` names the moment in the failure message.
pub async fn assert_whole_on_storage(
    job: &CheckpointStorage,
    meta: &CheckpointMetadata,
    when: &str,
) {
    let stored = stored(job).await;
    let id = meta.checkpoint_id;
    assert!(
        stored.contains_key(&format!("chk-{id}/_metadata")),
        "{when}: the _metadata of checkpoint {id} is gone"
    );
    let mut missing = Vec::new();
    for (_, handle) in meta.handles() {
        for file in handle.files() {
            match stored.get(&file.path) {
                Some(size) if *size == file.size => {}
                Some(size) => missing.push(format!(
                    "{} ({size} bytes, {} recorded)",
                    file.path, file.size
                )),
                None => missing.push(file.path.clone()),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{when}: checkpoint {id} references {} missing or changed file(s): {missing:?}",
        missing.len()
    );
}
