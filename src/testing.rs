//! Test support (feature `testing`): an object store that injects seeded faults.
//!
//! [`FaultyStore`] wraps any store and, while armed, makes requests of chosen kinds fail,
//! wait, hang, or (for single-part puts) store a truncated object and then fail, with
//! per-kind probabilities drawn from a seeded generator. Wrap it with
//! [`CheckpointStorage::from_store`](crate::CheckpointStorage::from_store) to run a job on
//! a storage that misbehaves.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use parking_lot::Mutex;

/// Kinds of requests, as faults are configured per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// Single-part put (small files, `_metadata`).
    Put,
    /// Start of a multipart upload (large files).
    PutMultipart,
    /// Get, ranged get and head.
    Get,
    /// Listings.
    List,
    /// Deletes.
    Delete,
    /// Server-side copies.
    Copy,
}

/// Fault probabilities of one request kind; they are tried in this order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// The request fails without effect.
    pub fail: f64,
    /// (Put only) a truncated object is stored, then the request fails.
    pub partial: f64,
    /// The request hangs for `hang_for` before it runs.
    pub hang: f64,
    /// The request waits up to `max_delay` before it runs.
    pub delay: f64,
}

/// What was injected, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injected {
    /// Failed requests (partial writes included).
    pub failed: BTreeMap<String, u64>,
    /// Truncated objects stored.
    pub partial: u64,
    /// Hung requests.
    pub hung: u64,
    /// Delayed requests.
    pub delayed: u64,
    /// Requests seen while armed.
    pub requests: u64,
}

/// An object store wrapper with seeded fault injection.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    seed: u64,
    counter: AtomicU64,
    armed: AtomicBool,
    faults: BTreeMap<Op, Faults>,
    max_delay: Duration,
    hang_for: Duration,
    injected: Mutex<Injected>,
}

/// What to do with one request.
enum Decision {
    Run,
    Fail,
    Partial,
    Wait(Duration),
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl FaultyStore {
    /// Wraps `inner`, armed, with no faults configured; `seed` drives every decision.
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64) -> Self {
        Self {
            inner,
            seed,
            counter: AtomicU64::new(0),
            armed: AtomicBool::new(true),
            faults: BTreeMap::new(),
            max_delay: Duration::from_millis(20),
            hang_for: Duration::from_secs(30),
            injected: Mutex::new(Injected::default()),
        }
    }

    /// Sets the faults of request kind `op`.
    pub fn with(mut self, op: Op, faults: Faults) -> Self {
        self.faults.insert(op, faults);
        self
    }

    /// Sets the same faults for every request kind.
    pub fn with_all(mut self, faults: Faults) -> Self {
        for op in [
            Op::Put,
            Op::PutMultipart,
            Op::Get,
            Op::List,
            Op::Delete,
            Op::Copy,
        ] {
            self.faults.insert(op, faults);
        }
        self
    }

    /// Longest injected delay (default 20 ms) and length of a hang (default 30 s).
    pub fn with_times(mut self, max_delay: Duration, hang_for: Duration) -> Self {
        self.max_delay = max_delay;
        self.hang_for = hang_for;
        self
    }

    /// Starts or stops injecting.
    pub fn arm(&self, armed: bool) {
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// What was injected so far.
    pub fn injected(&self) -> Injected {
        self.injected.lock().clone()
    }

    fn decide(&self, op: Op, location: &str) -> Decision {
        if !self.armed.load(Ordering::SeqCst) {
            return Decision::Run;
        }
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let mut injected = self.injected.lock();
        injected.requests += 1;
        let Some(faults) = self.faults.get(&op) else {
            return Decision::Run;
        };
        let draw = mix(self.seed ^ mix(n));
        let roll = (draw >> 11) as f64 / (1u64 << 53) as f64;
        let mut edge = faults.fail;
        if roll < edge {
            *injected.failed.entry(format!("{op:?}")).or_default() += 1;
            tracing::debug!(?op, location, "injected failure");
            return Decision::Fail;
        }
        edge += faults.partial;
        // Stores publish a single put atomically; a torn object is what a failed write of
        // a data file can leave behind on a careless store. `_metadata`, written with
        // create-if-absent, is never torn (the corruption tests damage it explicitly).
        if op == Op::Put && !location.ends_with("_metadata") && roll < edge {
            *injected.failed.entry(format!("{op:?}")).or_default() += 1;
            injected.partial += 1;
            return Decision::Partial;
        }
        edge += faults.hang;
        if roll < edge {
            injected.hung += 1;
            return Decision::Wait(self.hang_for);
        }
        edge += faults.delay;
        if roll < edge {
            injected.delayed += 1;
            let ms = self.max_delay.as_millis().max(1) as u64;
            return Decision::Wait(Duration::from_millis(mix(draw) % ms));
        }
        Decision::Run
    }

    fn error(op: Op, location: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "FaultyStore",
            source: format!("injected failure of {op:?} {location}").into(),
        }
    }

    /// Applies the decision for a request that has no partial form.
    async fn gate(&self, op: Op, location: &str) -> Result<()> {
        match self.decide(op, location) {
            Decision::Run | Decision::Partial => Ok(()),
            Decision::Fail => Err(Self::error(op, location)),
            Decision::Wait(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match self.decide(Op::Put, location.as_ref()) {
            Decision::Run => {}
            Decision::Fail => return Err(Self::error(Op::Put, location.as_ref())),
            Decision::Partial => {
                let bytes: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                let cut = bytes.len() / 2;
                let _ = self
                    .inner
                    .put_opts(location, PutPayload::from(bytes[..cut].to_vec()), opts)
                    .await;
                return Err(Self::error(Op::Put, location.as_ref()));
            }
            Decision::Wait(d) => tokio::time::sleep(d).await,
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.gate(Op::PutMultipart, location.as_ref()).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.gate(Op::Get, location.as_ref()).await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // Decided per stream: one draw fails the whole batch.
        match self.decide(Op::Delete, "(batch)") {
            Decision::Fail | Decision::Partial => {
                futures::stream::once(async { Err(Self::error(Op::Delete, "(batch)")) }).boxed()
            }
            Decision::Run | Decision::Wait(_) => self.inner.delete_stream(locations),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.decide(Op::List, &at) {
            Decision::Fail | Decision::Partial => {
                futures::stream::once(async move { Err(Self::error(Op::List, &at)) }).boxed()
            }
            Decision::Run | Decision::Wait(_) => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.gate(Op::List, &at).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.gate(Op::Copy, to.as_ref()).await?;
        self.inner.copy_opts(from, to, options).await
    }
}
