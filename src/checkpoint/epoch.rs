//! Writer epochs: at most one writer commits or deletes in a job directory, and every
//! restart starts a timeline that "latest" follows.
//!
//! # Claiming
//!
//! A coordinator claims the next epoch when it starts: it lists `_epochs/`, and writes
//! `_epochs/<n+1>` (20 digits) with create-if-absent, where `n` is the highest epoch
//! found. Create-if-absent works on every store, so of two writers racing for the same
//! number exactly one wins; the other lists again and claims the number above.
//!
//! # Fencing
//!
//! Before each `_metadata` commit and before each batch of deletes, a writer of epoch `e`
//! checks that `_epochs/<e+1>` does not exist (one metadata request). A newer claim
//! always creates `e+1` first, so a writer that finds it has been superseded and stops
//! with [`Error::Fenced`]; it never commits or deletes again.
//!
//! What it cannot stop: a request already sent by the old writer when the new one claims
//! (a paused process whose request lands late). Such a late `_metadata` is harmless: its
//! checkpoint id is below every id of the new writer (which allocates ids above every
//! `chk-N` it lists after claiming), and its epoch marks it as abandoned (below). A late
//! delete can only remove files the old writer had already released, after the commit of
//! a newer checkpoint of its own; the new writer restores what was the newest completed
//! checkpoint after its claim, and every restore checks size and CRC32 of every file, so
//! such a loss shows as a failed restore with a fallback, never as silently wrong state.
//!
//! # Lineage
//!
//! The claim records which checkpoint of its own directory the writer restored (id and
//! the epoch that committed it), or none when it started empty or from a snapshot
//! elsewhere. From the newest epoch down, these records form a chain of restores: the
//! current timeline is every checkpoint of the newest epoch, then the checkpoints of the
//! restored one's epoch up to the restored id, and so on down the chain. Any other
//! checkpoint is **abandoned**: a writer went back in time (a rollback to an older
//! checkpoint, a fresh start) and nobody continues it. "Latest", the coordinator's
//! retention and the sweep consider only checkpoints on the current timeline.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::CheckpointStorage;

/// The folder of the epoch records in a job directory.
pub(crate) const EPOCHS_DIR: &str = "_epochs";

const EPOCH_MAGIC: &[u8; 8] = b"RKSTEPCH";
const EPOCH_VERSION: u32 = 1;
/// Largest epoch record accepted.
const MAX_EPOCH_LEN: u64 = 64 << 10;
/// Attempts at claiming before giving up on a directory where others keep claiming.
const CLAIM_ATTEMPTS: u32 = 16;

/// The path of epoch `n`'s record.
pub(crate) fn epoch_path(n: u64) -> String {
    format!("{EPOCHS_DIR}/{n:020}")
}

fn parse_epoch_name(name: &str) -> Option<u64> {
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

/// A checkpoint of the job's own directory that a writer restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredPoint {
    /// Its id.
    pub checkpoint_id: u64,
    /// The epoch that committed it (0 before epochs existed).
    pub epoch: u64,
}

/// What a writer recorded when it claimed its epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch.
    pub epoch: u64,
    /// The checkpoint of this job directory the writer restored, or `None` when it
    /// started empty or from a snapshot elsewhere (every earlier checkpoint is then
    /// abandoned).
    pub restored_from: Option<RestoredPoint>,
    /// When it was claimed (ms since the Unix epoch).
    pub claimed_at_ms: u64,
    /// The snapshot of another directory (or a savepoint) the writer restored, by URL,
    /// when it restored no checkpoint of its own directory: until the new timeline's
    /// first checkpoint completes, resuming "latest" restores it again.
    #[serde(default)]
    pub restored_external: Option<String>,
    /// Who claimed it (host and process id), for operators.
    pub writer: String,
    /// Makes every claim's bytes unique, so reading back an ambiguous claim is exact.
    pub nonce: u64,
}

impl EpochRecord {
    fn encode(&self) -> Result<Vec<u8>> {
        let payload = serde_json::to_vec(self)
            .map_err(|e| Error::Internal(format!("encode an epoch record: {e}")))?;
        let mut out = Vec::with_capacity(payload.len() + 16);
        out.extend_from_slice(EPOCH_MAGIC);
        out.extend_from_slice(&EPOCH_VERSION.to_be_bytes());
        out.extend_from_slice(&payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        Ok(out)
    }

    fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        if bytes.len() < 16 || &bytes[..8] != EPOCH_MAGIC {
            return Err(Error::corrupt(what, "not a rockstate epoch record"));
        }
        let version = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != EPOCH_VERSION {
            return Err(Error::UnsupportedVersion {
                what: what.to_string(),
                found: version,
                supported: EPOCH_VERSION,
            });
        }
        let body_end = bytes.len() - 4;
        let stored = u32::from_be_bytes([
            bytes[body_end],
            bytes[body_end + 1],
            bytes[body_end + 2],
            bytes[body_end + 3],
        ]);
        if stored != crc32fast::hash(&bytes[..body_end]) {
            return Err(Error::corrupt(what, "CRC32 mismatch"));
        }
        serde_json::from_slice(&bytes[12..body_end]).map_err(|e| Error::corrupt(what, e))
    }
}

/// The epochs of a job directory, read lazily from the newest down.
pub(crate) struct Epochs<'a> {
    job: &'a CheckpointStorage,
    /// Every epoch number listed, ascending.
    listed: Vec<u64>,
    /// Records read so far.
    records: BTreeMap<u64, EpochRecord>,
}

impl<'a> Epochs<'a> {
    /// Lists the epochs of `job`.
    pub(crate) async fn list(job: &'a CheckpointStorage) -> Result<Epochs<'a>> {
        let mut listed: Vec<u64> = job
            .list(EPOCHS_DIR)
            .await?
            .iter()
            .filter_map(|o| o.path.strip_prefix("_epochs/").and_then(parse_epoch_name))
            .collect();
        listed.sort_unstable();
        Ok(Self {
            job,
            listed,
            records: BTreeMap::new(),
        })
    }

    /// The newest epoch (0 when none was ever claimed).
    pub(crate) fn current(&self) -> u64 {
        self.listed.last().copied().unwrap_or(0)
    }

    /// Every listed epoch number.
    pub(crate) fn listed(&self) -> &[u64] {
        &self.listed
    }

    /// The external snapshot the newest writer restored (see
    /// [`EpochRecord::restored_external`]), when it restored no checkpoint of this
    /// directory.
    ///
    /// Errors: storage errors; `Corrupt` for a damaged record.
    pub(crate) async fn newest_external(&mut self) -> Result<Option<String>> {
        let current = self.current();
        if current == 0 {
            return Ok(None);
        }
        let record = self.record(current).await?;
        Ok(match record.restored_from {
            Some(_) => None,
            None => record.restored_external.clone(),
        })
    }

    async fn record(&mut self, epoch: u64) -> Result<&EpochRecord> {
        if !self.records.contains_key(&epoch) {
            let path = epoch_path(epoch);
            let bytes = self.job.read_small(&path, MAX_EPOCH_LEN).await?;
            let record = EpochRecord::decode(&bytes, &self.job.url_of(&path))?;
            if record.epoch != epoch {
                return Err(Error::corrupt(
                    self.job.url_of(&path),
                    format!("the record names epoch {}", record.epoch),
                ));
            }
            self.records.insert(epoch, record);
        }
        Ok(&self.records[&epoch])
    }

    /// Whether checkpoint `checkpoint_id`, committed in epoch `epoch`, is on the current
    /// timeline: the chain of restores from the newest epoch down. A checkpoint of an
    /// epoch off the chain, or above the point where the chain left its epoch, is
    /// abandoned. Without any epoch record (a directory of an older version, or one whose
    /// records were removed) every checkpoint is live; so is one of an epoch newer than
    /// the listing (claimed since).
    ///
    /// Errors: storage errors; a damaged or missing record on the chain is `Corrupt`
    /// (nothing is decided from it).
    pub(crate) async fn is_live(&mut self, checkpoint_id: u64, epoch: u64) -> Result<bool> {
        let current = self.current();
        if current == 0 || epoch > current {
            return Ok(true);
        }
        let (mut at, mut bound) = (current, u64::MAX);
        loop {
            if at == epoch {
                return Ok(checkpoint_id <= bound);
            }
            if at < epoch || at == 0 {
                return Ok(false);
            }
            let record = match self.record(at).await {
                Ok(record) => record,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(Error::corrupt(
                        self.job.url_of(&epoch_path(at)),
                        "the epoch record on the restore chain is missing",
                    ))
                }
                Err(e) => return Err(e),
            };
            match record.restored_from {
                None => return Ok(false),
                Some(r) if r.epoch < at => {
                    bound = r.checkpoint_id;
                    at = r.epoch;
                }
                Some(r) => {
                    return Err(Error::corrupt(
                        self.job.url_of(&epoch_path(at)),
                        format!("restored from epoch {}, not an older one", r.epoch),
                    ))
                }
            }
        }
    }
}

/// The epoch a writer claimed: proof of ownership checked before each commit and delete.
#[derive(Debug, Clone)]
pub struct WriterEpoch {
    job: CheckpointStorage,
    record: EpochRecord,
}

impl WriterEpoch {
    /// Claims the next epoch of `job`, recording `restored_from` (see [`EpochRecord`]).
    ///
    /// Errors: storage errors; `Fenced` when other writers keep claiming faster than this
    /// one can.
    pub async fn claim(
        job: &CheckpointStorage,
        restored_from: Option<RestoredPoint>,
        restored_external: Option<String>,
        now_ms: u64,
    ) -> Result<Self> {
        let writer = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        let mut last = 0;
        for _ in 0..CLAIM_ATTEMPTS {
            let current = Epochs::list(job).await?.current();
            let next = current.checked_add(1).ok_or_else(|| {
                Error::corrupt(
                    job.url_of(&epoch_path(current)),
                    "the highest possible epoch is taken",
                )
            })?;
            let record = EpochRecord {
                epoch: next,
                restored_from,
                restored_external: restored_external.clone(),
                claimed_at_ms: now_ms,
                writer: writer.clone(),
                nonce: rand::random(),
            };
            let bytes = Bytes::from(record.encode()?);
            match job.put_if_absent(&epoch_path(record.epoch), bytes).await {
                Ok(()) => {
                    tracing::info!(job = %job.url(), epoch = record.epoch, ?restored_from, "claimed the job directory");
                    return Ok(Self {
                        job: job.clone(),
                        record,
                    });
                }
                // Another writer took this number: claim the one above.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => last = record.epoch,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Fenced {
            job: job.url().to_string(),
            ours: 0,
            newer: last,
        })
    }

    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// What was recorded at the claim.
    pub fn record(&self) -> &EpochRecord {
        &self.record
    }

    /// Checks that no newer writer has claimed the job directory.
    ///
    /// Errors: `Fenced` when one has; storage errors (the caller must not go on then).
    pub async fn check(&self) -> Result<()> {
        let Some(newer) = self.record.epoch.checked_add(1) else {
            return Ok(());
        };
        let next = epoch_path(newer);
        let found = self.job.retrying("head", |_| self.job.size_of(&next)).await;
        match found {
            Ok(_) => Err(Error::Fenced {
                job: self.job.url().to_string(),
                ours: self.record.epoch,
                newer,
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let record = EpochRecord {
            epoch: 7,
            restored_from: Some(RestoredPoint {
                checkpoint_id: 3,
                epoch: 2,
            }),
            restored_external: None,
            claimed_at_ms: 1,
            writer: "h:1".into(),
            nonce: 9,
        };
        let bytes = record.encode().unwrap();
        assert_eq!(EpochRecord::decode(&bytes, "e").unwrap(), record);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(EpochRecord::decode(&bad, "e").is_err(), "byte {i}");
        }
        for cut in 0..bytes.len() {
            assert!(EpochRecord::decode(&bytes[..cut], "e").is_err());
        }
        assert_eq!(parse_epoch_name(&format!("{:020}", 12)), Some(12));
        assert_eq!(parse_epoch_name("12"), None);
    }

    #[tokio::test]
    async fn claims_are_sequential_and_fence_older_writers() {
        let job = CheckpointStorage::open("memory:///epoch-test").unwrap();
        let first = WriterEpoch::claim(&job, None, None, 1).await.unwrap();
        assert_eq!(first.epoch(), 1);
        first.check().await.unwrap();
        let at_4 = RestoredPoint {
            checkpoint_id: 4,
            epoch: 1,
        };
        let second = WriterEpoch::claim(&job, Some(at_4), None, 2).await.unwrap();
        assert_eq!(second.epoch(), 2);
        assert_eq!(first.check().await.unwrap_err().kind(), ErrorKind::Fenced);
        second.check().await.unwrap();

        let mut epochs = Epochs::list(&job).await.unwrap();
        assert_eq!(epochs.current(), 2);
        // Epoch 2 restored checkpoint 4 of epoch 1: 5 of epoch 1 is abandoned; 4 and 3
        // are on the timeline, and so is everything epoch 2 commits.
        assert!(!epochs.is_live(5, 1).await.unwrap());
        assert!(epochs.is_live(4, 1).await.unwrap());
        assert!(epochs.is_live(3, 1).await.unwrap());
        assert!(epochs.is_live(9, 2).await.unwrap());
        // Epoch 1 started empty: everything before epochs is abandoned.
        assert!(!epochs.is_live(1, 0).await.unwrap());

        // Epoch 3 restores the abandoned checkpoint 5 on purpose: it is live again, and
        // epoch 2's checkpoints are abandoned.
        let at_5 = RestoredPoint {
            checkpoint_id: 5,
            epoch: 1,
        };
        WriterEpoch::claim(&job, Some(at_5), None, 3).await.unwrap();
        let mut epochs = Epochs::list(&job).await.unwrap();
        assert!(epochs.is_live(5, 1).await.unwrap());
        assert!(!epochs.is_live(6, 1).await.unwrap());
        assert!(!epochs.is_live(9, 2).await.unwrap());
        assert!(epochs.is_live(10, 3).await.unwrap());
    }
}
