//! Named places where crash tests kill the process (feature `testing`).
//!
//! With the `testing` feature, `ROCKSTATE_CRASH_AT=<point>:<n>` makes the `n`-th pass
//! (1-based) through `point` send SIGKILL to the process itself: a real, unannounced
//! death at a precise step of a checkpoint. Without the feature, [`hit`] compiles to
//! nothing. Points:
//!
//! - `record`: a harness subtask is about to process a record (state writes);
//! - `sync`: inside the synchronous phase of a snapshot, before its memtables are sealed
//!   (or flushed);
//! - `upload`: after one file of a snapshot was stored, before the next;
//! - `metadata`: every subtask acknowledged, before `_metadata` is written;
//! - `committed`: `_metadata` was written, before subtasks are told;
//! - `retention`: a subsumed checkpoint's `_metadata` was deleted, before its files are.

/// Passes through `point`; kills the process when the crash schedule says so.
#[inline]
pub(crate) fn hit(point: &'static str) {
    #[cfg(feature = "testing")]
    armed::hit(point);
    #[cfg(not(feature = "testing"))]
    let _ = point;
}

#[cfg(feature = "testing")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// The environment variable that arms a crash.
    pub const VARIABLE: &str = "ROCKSTATE_CRASH_AT";

    static SCHEDULE: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);

    fn schedule() -> &'static Option<(String, u64)> {
        SCHEDULE.get_or_init(|| {
            let value = std::env::var(VARIABLE).ok()?;
            let (point, n) = value.rsplit_once(':')?;
            Some((point.to_string(), n.parse().ok()?))
        })
    }

    pub fn hit(point: &'static str) {
        let Some((armed, n)) = schedule() else {
            return;
        };
        if armed != point {
            return;
        }
        if PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("rockstate: crash point {point}:{n} reached, killing the process");
            // SAFETY: getpid and kill have no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // SIGKILL cannot be caught; wait for it to land.
            loop {
                std::thread::park();
            }
        }
    }
}
