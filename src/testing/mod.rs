//! Test support (feature `testing`): object stores that misbehave on purpose, a real
//! S3-protocol server for tests ([`s3::S3Server`]), checks of what a job directory holds
//! ([`checks`]) and a seeded generator whose sequence never changes ([`SeededRng`]).
//!
//! - [`FaultyStore`] wraps any store and, while armed, makes requests of chosen kinds fail,
//!   wait, hang, or (for single-part puts) store a truncated object and then fail, with
//!   per-kind probabilities drawn from a seeded generator.
//! - [`GatedStore`] wraps any store and lets a test decide the schedule: requests that
//!   match a [`Gate`] wait until the test releases them (or makes them fail), writes can
//!   land and still be reported as failed ([`Lie`]), requests can fail a given number of
//!   times, and every request is logged.
//!
//! Both stores forward every method of `ObjectStore` explicitly (none falls back to a
//! default built on another method), so every request passes their rules exactly once.
//!
//! Wrap either with [`CheckpointStorage::from_store`](crate::CheckpointStorage::from_store)
//! to run a job on a storage that misbehaves. Two `GatedStore`s around the same inner
//! store give two actors (say, a job and the orphan sweep) the same objects but separate
//! gates.

pub mod checks;
pub mod fixtures;
mod rng;
pub mod s3;

pub use rng::SeededRng;

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

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.gate(Op::Get, location.as_ref()).await?;
        self.inner.get_ranges(location, ranges).await
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

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.decide(Op::List, &at) {
            Decision::Fail | Decision::Partial => {
                futures::stream::once(async move { Err(Self::error(Op::List, &at)) }).boxed()
            }
            Decision::Run | Decision::Wait(_) => self.inner.list_with_offset(prefix, offset),
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

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::RenameOptions,
    ) -> Result<()> {
        self.gate(Op::Copy, to.as_ref()).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

/// Which requests a [`Gate`], a [`Lie`] or a failure rule of a [`GatedStore`] applies to:
/// a request kind (or any) and a predicate on the object's path, as the store sees it
/// (relative to the store's root, no leading `/`; the prefix for listings; the destination
/// for copies).
#[derive(Clone)]
pub struct Match {
    op: Option<Op>,
    path: PathPredicate,
}

#[derive(Clone)]
enum PathPredicate {
    Any,
    Is(String),
    Contains(String),
    StartsWith(String),
    EndsWith(String),
    Custom(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match &self.path {
            PathPredicate::Any => "any path".to_string(),
            PathPredicate::Is(p) => format!("path = {p:?}"),
            PathPredicate::Contains(p) => format!("path contains {p:?}"),
            PathPredicate::StartsWith(p) => format!("path starts with {p:?}"),
            PathPredicate::EndsWith(p) => format!("path ends with {p:?}"),
            PathPredicate::Custom(_) => "custom path predicate".to_string(),
        };
        match self.op {
            Some(op) => write!(f, "{op:?} where {path}"),
            None => write!(f, "any request where {path}"),
        }
    }
}

impl Match {
    /// Requests of kind `op`, any path.
    pub fn op(op: Op) -> Self {
        Self {
            op: Some(op),
            path: PathPredicate::Any,
        }
    }

    /// Every request.
    pub fn any() -> Self {
        Self {
            op: None,
            path: PathPredicate::Any,
        }
    }

    /// Only the path `path`.
    pub fn path_is(mut self, path: impl Into<String>) -> Self {
        self.path = PathPredicate::Is(path.into());
        self
    }

    /// Only paths containing `part`.
    pub fn path_contains(mut self, part: impl Into<String>) -> Self {
        self.path = PathPredicate::Contains(part.into());
        self
    }

    /// Only paths starting with `prefix`.
    pub fn path_starts_with(mut self, prefix: impl Into<String>) -> Self {
        self.path = PathPredicate::StartsWith(prefix.into());
        self
    }

    /// Only paths ending with `suffix`.
    pub fn path_ends_with(mut self, suffix: impl Into<String>) -> Self {
        self.path = PathPredicate::EndsWith(suffix.into());
        self
    }

    /// Only paths for which `predicate` holds.
    pub fn path_matches(
        mut self,
        predicate: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.path = PathPredicate::Custom(Arc::new(predicate));
        self
    }

    /// Whether a request of kind `op` on `path` matches.
    pub fn matches(&self, op: Op, path: &str) -> bool {
        if self.op.is_some_and(|o| o != op) {
            return false;
        }
        match &self.path {
            PathPredicate::Any => true,
            PathPredicate::Is(p) => path == p,
            PathPredicate::Contains(p) => path.contains(p.as_str()),
            PathPredicate::StartsWith(p) => path.starts_with(p.as_str()),
            PathPredicate::EndsWith(p) => path.ends_with(p.as_str()),
            PathPredicate::Custom(f) => f(path),
        }
    }
}

/// A write that lands and is still reported as failed (see [`GatedStore::lie`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// The request is applied to the inner store, then answered with
    /// `object_store::Error::Generic` (a 5xx or a timeout after the object was stored).
    /// For a multipart upload the lie is told when the upload completes; for reads and
    /// listings the answer is lost.
    AppliedThenError,
    /// A conditional create (`PutMode::Create` puts, `CopyMode::Create` copies) is
    /// applied, then answered `object_store::Error::AlreadyExists`: what a client's own
    /// retry of a request that landed gets back. Other requests do not match.
    AppliedThenAlreadyExists,
}

/// One request seen by a [`GatedStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its kind (renames are logged as copies).
    pub op: Op,
    /// The object's path (the prefix for listings, the destination for copies).
    pub path: String,
    /// The source of a copy.
    pub from: Option<String>,
}

/// How a held request continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
}

#[derive(Debug, Default)]
struct GateState {
    /// No longer holding anything (opened, or dropped).
    open: bool,
    /// Requests this gate caught so far.
    caught: u64,
    /// Caught and waiting for a verdict, oldest first.
    held: std::collections::VecDeque<(String, tokio::sync::oneshot::Sender<Verdict>)>,
    /// Verdicts given before the request they apply to arrived.
    banked: std::collections::VecDeque<Verdict>,
}

struct GateShared {
    rule: Match,
    persistent: bool,
    state: Mutex<GateState>,
    arrivals_tx: tokio::sync::mpsc::UnboundedSender<String>,
    arrivals_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

impl GateShared {
    /// Catches the request if this gate holds it: `None` when the gate does not apply,
    /// else the verdict (already known, or to wait for).
    fn catch(&self, op: Op, path: &str) -> Option<Caught> {
        let mut state = self.state.lock();
        if state.open || !self.rule.matches(op, path) || (!self.persistent && state.caught > 0) {
            return None;
        }
        state.caught += 1;
        // The receiver lives as long as this gate: sending cannot fail.
        let _ = self.arrivals_tx.send(path.to_string());
        if let Some(verdict) = state.banked.pop_front() {
            return Some(Caught::Decided(verdict));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        state.held.push_back((path.to_string(), tx));
        Some(Caught::Held(rx))
    }

    fn decide(&self, verdict: Verdict) -> Option<String> {
        let mut state = self.state.lock();
        while let Some((path, tx)) = state.held.pop_front() {
            // A request whose caller gave up is skipped.
            if tx.send(verdict).is_ok() {
                return Some(path);
            }
        }
        if !state.open {
            state.banked.push_back(verdict);
        }
        None
    }

    fn open(&self) {
        let mut state = self.state.lock();
        state.open = true;
        state.banked.clear();
        for (_, tx) in state.held.drain(..) {
            let _ = tx.send(Verdict::Pass);
        }
    }
}

enum Caught {
    Decided(Verdict),
    Held(tokio::sync::oneshot::Receiver<Verdict>),
}

/// A test's handle on a gate of a [`GatedStore`]
/// ([`gate`](GatedStore::gate), [`gate_persistent`](GatedStore::gate_persistent)).
///
/// Requests the gate catches wait (asynchronously, without polling) until the test
/// gives a verdict: [`release`](Self::release) lets the oldest one run,
/// [`release_with_error`](Self::release_with_error) fails it without effect. A verdict
/// given while nothing is held applies to the next request caught. Dropping the handle
/// (or [`open`](Self::open)) lets every held and later request through.
pub struct Gate {
    shared: Arc<GateShared>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("Gate")
            .field("rule", &self.shared.rule)
            .field("persistent", &self.shared.persistent)
            .field("caught", &state.caught)
            .field("held", &state.held.len())
            .finish()
    }
}

impl Gate {
    /// Waits until the gate has caught a request not reported yet, and returns its path.
    /// Requests are reported once each, in the order they arrived.
    pub async fn wait_arrived(&self) -> String {
        let mut arrivals = self.shared.arrivals_rx.lock().await;
        arrivals
            .recv()
            .await
            .expect("a gate keeps its own sender: the channel never closes")
    }

    /// [`wait_arrived`](Self::wait_arrived) for synchronous code (for example a test
    /// driving a [`Harness`](crate::harness::Harness)). Do not call it on a thread of the
    /// runtime that issues the request.
    pub fn wait_arrived_blocking(&self) -> String {
        futures::executor::block_on(self.wait_arrived())
    }

    /// Lets the oldest held request run; returns its path, or `None` when nothing is
    /// held (the next request caught then runs without waiting).
    pub fn release(&self) -> Option<String> {
        self.shared.decide(Verdict::Pass)
    }

    /// Fails the oldest held request without effect (with `object_store::Error::Generic`,
    /// a transient error); returns its path, or `None` when nothing is held (the next
    /// request caught then fails).
    pub fn release_with_error(&self) -> Option<String> {
        self.shared.decide(Verdict::Fail)
    }

    /// Lets every held request run and stops holding new ones.
    pub fn open(&self) {
        self.shared.open();
    }

    /// Requests caught so far.
    pub fn caught(&self) -> u64 {
        self.shared.state.lock().caught
    }

    /// Requests held right now.
    pub fn held(&self) -> usize {
        self.shared.state.lock().held.len()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.open();
    }
}

/// A failure rule: the next `remaining` matching requests fail or lie.
struct FaultRule {
    rule: Match,
    effect: Effect,
    remaining: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Fail,
    Lie(Lie),
}

/// What a request does once past the gates and rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Run,
    Lie(Lie),
}

#[derive(Default)]
struct GatedShared {
    gates: Mutex<Vec<Arc<GateShared>>>,
    rules: Mutex<Vec<FaultRule>>,
    log: Mutex<Vec<Request>>,
}

impl GatedShared {
    /// Logs a request, holds it at the first gate that catches it, then applies the first
    /// failure rule that matches. `create`: whether it is a conditional create.
    async fn pass(&self, op: Op, path: &str, from: Option<&str>, create: bool) -> Result<Action> {
        self.log.lock().push(Request {
            op,
            path: path.to_string(),
            from: from.map(str::to_string),
        });
        let caught = {
            let mut gates = self.gates.lock();
            gates.retain(|g| !g.state.lock().open);
            gates.iter().find_map(|g| g.catch(op, path))
        };
        let verdict = match caught {
            None => Verdict::Pass,
            Some(Caught::Decided(v)) => v,
            // A gate dropped before deciding lets the request through.
            Some(Caught::Held(rx)) => rx.await.unwrap_or(Verdict::Pass),
        };
        if verdict == Verdict::Fail {
            return Err(gated_error(op, path, "failed at a gate"));
        }
        let mut rules = self.rules.lock();
        let applies = |r: &FaultRule| {
            r.remaining > 0
                && r.rule.matches(op, path)
                && (r.effect != Effect::Lie(Lie::AppliedThenAlreadyExists) || create)
        };
        let Some(rule) = rules.iter_mut().find(|r| applies(r)) else {
            return Ok(Action::Run);
        };
        rule.remaining -= 1;
        match rule.effect {
            Effect::Fail => Err(gated_error(op, path, "injected transient failure")),
            Effect::Lie(lie) => Ok(Action::Lie(lie)),
        }
    }
}

fn gated_error(op: Op, path: &str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "GatedStore",
        source: format!("{what}: {op:?} {path}").into(),
    }
}

/// The answer a lie gives for a request that was applied.
fn lie_error(lie: Lie, op: Op, path: &str) -> object_store::Error {
    match lie {
        Lie::AppliedThenError => gated_error(op, path, "applied, then reported as failed"),
        Lie::AppliedThenAlreadyExists => object_store::Error::AlreadyExists {
            path: path.to_string(),
            source: "applied, then reported as already existing".into(),
        },
    }
}

/// An object store wrapper whose schedule and replies a test controls.
///
/// - **Gates** ([`gate`](Self::gate), [`gate_persistent`](Self::gate_persistent)) hold
///   matching requests until the test releases them, so the test decides the interleaving
///   of concurrent actors exactly, without sleeps.
/// - **Lies** ([`lie`](Self::lie)): matching requests are applied to the inner store and
///   then reported as failed.
/// - **Failures** ([`fail`](Self::fail)): matching requests fail without effect, with a
///   transient error, a given number of times.
/// - **Log** ([`requests`](Self::requests)): every request, in arrival order.
///
/// A request first goes through the gates (the first one that catches it holds it), then
/// through the lie and failure rules (the first one that matches and is not used up
/// applies). Gets, ranged gets and heads are [`Op::Get`]; renames count as [`Op::Copy`];
/// deletes are gated one path at a time.
pub struct GatedStore {
    inner: Arc<dyn ObjectStore>,
    shared: Arc<GatedShared>,
}

impl fmt::Debug for GatedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatedStore({})", self.inner)
    }
}

impl fmt::Display for GatedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatedStore({})", self.inner)
    }
}

impl GatedStore {
    /// Wraps `inner`, with no gates or rules: every request runs as it would.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            shared: Arc::default(),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn install(&self, rule: Match, persistent: bool) -> Gate {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(GateShared {
            rule,
            persistent,
            state: Mutex::new(GateState::default()),
            arrivals_tx: tx,
            arrivals_rx: tokio::sync::Mutex::new(rx),
        });
        self.shared.gates.lock().push(shared.clone());
        Gate { shared }
    }

    /// Installs a one-shot gate: it holds only the next request matching `rule`.
    pub fn gate(&self, rule: Match) -> Gate {
        self.install(rule, false)
    }

    /// Installs a persistent gate: it holds every request matching `rule`, each until
    /// released, until it is opened or dropped.
    pub fn gate_persistent(&self, rule: Match) -> Gate {
        self.install(rule, true)
    }

    /// The next `times` requests matching `rule` are applied and then answered with a
    /// lie (`u64::MAX`: every one).
    pub fn lie(&self, rule: Match, lie: Lie, times: u64) {
        self.shared.rules.lock().push(FaultRule {
            rule,
            effect: Effect::Lie(lie),
            remaining: times,
        });
    }

    /// The next `times` requests matching `rule` fail without effect, with a transient
    /// error (`object_store::Error::Generic`; `u64::MAX`: every one).
    pub fn fail(&self, rule: Match, times: u64) {
        self.shared.rules.lock().push(FaultRule {
            rule,
            effect: Effect::Fail,
            remaining: times,
        });
    }

    /// Removes every lie and failure rule (gates stay).
    pub fn clear_rules(&self) {
        self.shared.rules.lock().clear();
    }

    /// Lies and failures not used yet, over all rules (saturating).
    pub fn rules_left(&self) -> u64 {
        self.shared
            .rules
            .lock()
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.remaining))
    }

    /// Every request seen so far, in arrival order (before any gate held it).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.shared.log.lock().clear();
    }
}

/// A multipart upload whose completion lies.
#[derive(Debug)]
struct LyingUpload {
    inner: Box<dyn MultipartUpload>,
    path: String,
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl MultipartUpload for LyingUpload {
    fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.inner.complete().await?;
        Err(lie_error(
            Lie::AppliedThenError,
            Op::PutMultipart,
            &self.path,
        ))
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

/// A listing of `prefix` that first passes the gates.
fn gated_listing(
    shared: Arc<GatedShared>,
    inner: Arc<dyn ObjectStore>,
    prefix: Option<&Path>,
    offset: Option<&Path>,
) -> BoxStream<'static, Result<ObjectMeta>> {
    let prefix = prefix.cloned();
    let offset = offset.cloned();
    let at = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
    futures::stream::once(async move {
        let list = |inner: &Arc<dyn ObjectStore>| match &offset {
            Some(offset) => inner.list_with_offset(prefix.as_ref(), offset),
            None => inner.list(prefix.as_ref()),
        };
        match shared.pass(Op::List, &at, None, false).await {
            Ok(Action::Run) => list(&inner),
            Ok(Action::Lie(lie)) => {
                let _ = list(&inner).collect::<Vec<_>>().await;
                futures::stream::once(async move { Err(lie_error(lie, Op::List, &at)) }).boxed()
            }
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    })
    .flatten()
    .boxed()
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for GatedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let path = location.as_ref();
        let create = matches!(opts.mode, object_store::PutMode::Create);
        match self.shared.pass(Op::Put, path, None, create).await? {
            Action::Run => self.inner.put_opts(location, payload, opts).await,
            Action::Lie(lie) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(lie_error(lie, Op::Put, path))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let path = location.as_ref();
        let action = self
            .shared
            .pass(Op::PutMultipart, path, None, false)
            .await?;
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(match action {
            Action::Run => upload,
            Action::Lie(_) => Box::new(LyingUpload {
                inner: upload,
                path: path.to_string(),
            }),
        })
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let path = location.as_ref();
        match self.shared.pass(Op::Get, path, None, false).await? {
            Action::Run => self.inner.get_opts(location, options).await,
            Action::Lie(lie) => {
                self.inner.get_opts(location, options).await?;
                Err(lie_error(lie, Op::Get, path))
            }
        }
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        let path = location.as_ref();
        match self.shared.pass(Op::Get, path, None, false).await? {
            Action::Run => self.inner.get_ranges(location, ranges).await,
            Action::Lie(lie) => {
                self.inner.get_ranges(location, ranges).await?;
                Err(lie_error(lie, Op::Get, path))
            }
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        locations
            .then(move |location| {
                let shared = shared.clone();
                let inner = inner.clone();
                async move {
                    let location = location?;
                    let action = shared
                        .pass(Op::Delete, location.as_ref(), None, false)
                        .await?;
                    let one = futures::stream::once({
                        let location = location.clone();
                        async move { Ok(location) }
                    })
                    .boxed();
                    let deleted = inner.delete_stream(one).next().await;
                    match (deleted, action) {
                        (Some(Err(e)), _) => Err(e),
                        (_, Action::Lie(lie)) => Err(lie_error(lie, Op::Delete, location.as_ref())),
                        _ => Ok(location),
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        gated_listing(self.shared.clone(), self.inner.clone(), prefix, None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        gated_listing(
            self.shared.clone(),
            self.inner.clone(),
            prefix,
            Some(offset),
        )
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.shared.pass(Op::List, &at, None, false).await? {
            Action::Run => self.inner.list_with_delimiter(prefix).await,
            Action::Lie(lie) => {
                self.inner.list_with_delimiter(prefix).await?;
                Err(lie_error(lie, Op::List, &at))
            }
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let path = to.as_ref();
        let create = matches!(options.mode, object_store::CopyMode::Create);
        match self
            .shared
            .pass(Op::Copy, path, Some(from.as_ref()), create)
            .await?
        {
            Action::Run => self.inner.copy_opts(from, to, options).await,
            Action::Lie(lie) => {
                self.inner.copy_opts(from, to, options).await?;
                Err(lie_error(lie, Op::Copy, path))
            }
        }
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::RenameOptions,
    ) -> Result<()> {
        let path = to.as_ref();
        let create = matches!(options.target_mode, object_store::RenameTargetMode::Create);
        match self
            .shared
            .pass(Op::Copy, path, Some(from.as_ref()), create)
            .await?
        {
            Action::Run => self.inner.rename_opts(from, to, options).await,
            Action::Lie(lie) => {
                self.inner.rename_opts(from, to, options).await?;
                Err(lie_error(lie, Op::Copy, path))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutMode};

    fn store() -> (Arc<InMemory>, Arc<GatedStore>) {
        let inner = Arc::new(InMemory::new());
        (inner.clone(), Arc::new(GatedStore::new(inner)))
    }

    fn create() -> PutOptions {
        PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        }
    }

    async fn exists(store: &dyn ObjectStore, path: &str) -> bool {
        store.head(&Path::from(path)).await.is_ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gate_holds_a_request_until_released() {
        let (inner, gated) = store();
        let gate = gated.gate(Match::op(Op::Put).path_ends_with("_metadata"));
        let put = tokio::spawn({
            let gated = gated.clone();
            async move { gated.put(&Path::from("a/_metadata"), "x".into()).await }
        });
        assert_eq!(gate.wait_arrived().await, "a/_metadata");
        assert_eq!(gate.held(), 1);
        assert!(
            !exists(inner.as_ref(), "a/_metadata").await,
            "held, not run"
        );
        // Other requests are not held.
        gated.put(&Path::from("a/data"), "y".into()).await.unwrap();
        assert_eq!(gate.release().as_deref(), Some("a/_metadata"));
        put.await.unwrap().unwrap();
        assert!(exists(inner.as_ref(), "a/_metadata").await);
        // One-shot: the next matching request runs.
        gated
            .put(&Path::from("b/_metadata"), "z".into())
            .await
            .unwrap();
        assert_eq!(gate.caught(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gate_can_fail_a_request_without_effect() {
        let (inner, gated) = store();
        let gate = gated.gate(Match::op(Op::Put));
        let put = tokio::spawn({
            let gated = gated.clone();
            async move { gated.put(&Path::from("f"), "x".into()).await }
        });
        gate.wait_arrived().await;
        gate.release_with_error();
        let err = put.await.unwrap().unwrap_err();
        assert!(matches!(err, object_store::Error::Generic { .. }), "{err}");
        assert!(!exists(inner.as_ref(), "f").await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persistent_gates_hold_every_request_and_verdicts_can_come_first() {
        let (inner, gated) = store();
        inner.put(&Path::from("d/1"), "1".into()).await.unwrap();
        inner.put(&Path::from("d/2"), "2".into()).await.unwrap();
        let gate = gated.gate_persistent(Match::op(Op::Delete).path_starts_with("d/"));
        // A verdict given before the request arrives applies to it.
        assert_eq!(gate.release_with_error(), None);
        let err = gated.delete(&Path::from("d/1")).await.unwrap_err();
        assert!(matches!(err, object_store::Error::Generic { .. }));
        assert_eq!(gate.wait_arrived().await, "d/1");
        assert!(exists(inner.as_ref(), "d/1").await);

        let deletes = tokio::spawn({
            let gated = gated.clone();
            async move {
                gated.delete(&Path::from("d/1")).await?;
                gated.delete(&Path::from("d/2")).await
            }
        });
        assert_eq!(gate.wait_arrived().await, "d/1");
        gate.release();
        assert_eq!(gate.wait_arrived().await, "d/2");
        assert!(!exists(inner.as_ref(), "d/1").await);
        assert!(exists(inner.as_ref(), "d/2").await, "held");
        gate.open();
        deletes.await.unwrap().unwrap();
        assert!(!exists(inner.as_ref(), "d/2").await);
        // Open: nothing is held any more.
        gated.put(&Path::from("d/3"), "3".into()).await.unwrap();
        gated.delete(&Path::from("d/3")).await.unwrap();
        assert_eq!(gate.caught(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_gate_lets_its_requests_through() {
        let (_inner, gated) = store();
        let gate = gated.gate(Match::op(Op::List));
        let listing = tokio::spawn({
            let gated = gated.clone();
            async move { gated.list_with_delimiter(None).await }
        });
        assert_eq!(gate.wait_arrived().await, "");
        drop(gate);
        listing.await.unwrap().unwrap();
        // Streams are gated too.
        let gate = gated.gate(Match::op(Op::List).path_is("p"));
        let listing = tokio::spawn({
            let gated = gated.clone();
            async move { gated.list(Some(&Path::from("p"))).collect::<Vec<_>>().await }
        });
        assert_eq!(gate.wait_arrived().await, "p");
        gate.release();
        assert!(listing.await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn lies_apply_the_request_and_report_a_failure() {
        let (inner, gated) = store();
        gated.lie(Match::op(Op::Put).path_is("m"), Lie::AppliedThenError, 1);
        let err = gated.put(&Path::from("m"), "1".into()).await.unwrap_err();
        assert!(matches!(err, object_store::Error::Generic { .. }), "{err}");
        assert!(exists(inner.as_ref(), "m").await, "applied");
        gated.put(&Path::from("m"), "2".into()).await.unwrap();

        gated.lie(Match::op(Op::Put), Lie::AppliedThenAlreadyExists, u64::MAX);
        // Only conditional creates are answered AlreadyExists.
        gated.put(&Path::from("plain"), "p".into()).await.unwrap();
        let err = gated
            .put_opts(&Path::from("c"), "c".into(), create())
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::AlreadyExists { .. }),
            "{err}"
        );
        assert_eq!(
            inner
                .get(&Path::from("c"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            "c"
        );
        gated.clear_rules();
        assert_eq!(gated.rules_left(), 0);

        gated.lie(Match::op(Op::Copy), Lie::AppliedThenError, 1);
        assert!(gated
            .copy(&Path::from("c"), &Path::from("c2"))
            .await
            .is_err());
        assert!(exists(inner.as_ref(), "c2").await);
        gated.lie(Match::op(Op::Delete), Lie::AppliedThenError, 1);
        assert!(gated.delete(&Path::from("c2")).await.is_err());
        assert!(!exists(inner.as_ref(), "c2").await);
    }

    #[tokio::test]
    async fn a_lying_multipart_upload_is_stored() {
        let (inner, gated) = store();
        gated.lie(Match::op(Op::PutMultipart), Lie::AppliedThenError, 1);
        let mut upload = gated.put_multipart(&Path::from("big")).await.unwrap();
        upload.put_part("abc".into()).await.unwrap();
        assert!(upload.complete().await.is_err());
        assert!(exists(inner.as_ref(), "big").await);
    }

    #[tokio::test]
    async fn failures_are_counted_and_requests_logged() {
        let (inner, gated) = store();
        inner.put(&Path::from("x/y"), "v".into()).await.unwrap();
        gated.fail(Match::op(Op::Get).path_contains("x/"), 2);
        for _ in 0..2 {
            let err = gated.get(&Path::from("x/y")).await.unwrap_err();
            assert!(matches!(err, object_store::Error::Generic { .. }));
        }
        assert_eq!(gated.head(&Path::from("x/y")).await.unwrap().size, 1);
        gated.get_range(&Path::from("x/y"), 0..1).await.unwrap();
        assert_eq!(gated.rules_left(), 0);
        gated
            .copy(&Path::from("x/y"), &Path::from("x/z"))
            .await
            .unwrap();
        let log = gated.requests();
        assert_eq!(log.len(), 5);
        assert!(log[..4].iter().all(|r| r.op == Op::Get && r.path == "x/y"));
        assert_eq!(
            log[4],
            Request {
                op: Op::Copy,
                path: "x/z".into(),
                from: Some("x/y".into())
            }
        );
        gated.clear_requests();
        assert!(gated.requests().is_empty());
        assert!(Match::any().matches(Op::List, ""));
        assert!(Match::op(Op::Get)
            .path_matches(|p| p.len() == 3)
            .matches(Op::Get, "abc"));
        assert!(!Match::op(Op::Get).matches(Op::Put, "abc"));
    }

    #[test]
    fn a_blocking_wait_sees_arrivals_from_a_runtime() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (_inner, gated) = store();
        let gate = gated.gate(Match::op(Op::Put));
        let put = runtime.spawn({
            let gated = gated.clone();
            async move { gated.put(&Path::from("q"), "q".into()).await }
        });
        assert_eq!(gate.wait_arrived_blocking(), "q");
        gate.release();
        runtime.block_on(put).unwrap().unwrap();
    }
}
