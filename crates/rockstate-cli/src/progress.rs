//! A progress line on stderr for long transfers, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::format;

/// Redraws at most this often.
const REDRAW: Duration = Duration::from_millis(100);

/// A byte or item counter towards a known total.
pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    bytes: bool,
    started: Instant,
    /// When the line was last drawn; `None` when drawing is off.
    drawn: Option<Mutex<Instant>>,
}

impl Progress {
    /// A counter of `total` bytes.
    pub fn bytes(label: &str, total: u64) -> Self {
        Self::new(label, total, true)
    }

    /// A counter of `total` items.
    pub fn items(label: &str, total: u64) -> Self {
        Self::new(label, total, false)
    }

    fn new(label: &str, total: u64, bytes: bool) -> Self {
        let now = Instant::now();
        Self {
            label: label.to_string(),
            total,
            done: AtomicU64::new(0),
            bytes,
            started: now,
            drawn: redraws().then(|| Mutex::new(now - REDRAW)),
        }
    }

    /// Counts `n` more.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.draw(done, false);
    }

    /// Sets the count.
    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.draw(done, false);
    }

    fn draw(&self, done: u64, force: bool) {
        let Some(drawn) = &self.drawn else {
            return;
        };
        let Some(mut last) = drawn.try_lock() else {
            return;
        };
        if !force && last.elapsed() < REDRAW {
            return;
        }
        *last = Instant::now();
        let total = self.total.max(1);
        let ratio = (done as f64 / total as f64).min(1.0);
        let width = 30;
        let filled = (ratio * width as f64) as usize;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let (done_s, total_s, rate) = if self.bytes {
            (
                format::bytes(done),
                format::bytes(self.total),
                format!("{}/s", format::bytes((done as f64 / secs) as u64)),
            )
        } else {
            (
                done.to_string(),
                self.total.to_string(),
                format!("{:.0}/s", done as f64 / secs),
            )
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} [{}{}] {:>3.0}% {done_s}/{total_s} {rate}",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            ratio * 100.0
        );
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&self) {
        if self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }

    /// Prints `line` on stderr above the progress line.
    pub fn println(&self, line: &str) {
        if self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = writeln!(err, "{line}");
            drop(err);
            self.draw(self.done.load(Ordering::Relaxed), true);
        } else {
            eprintln!("{line}");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
/// Whether stderr is a terminal that can redraw a line: not when `TERM=dumb`.
fn redraws() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// Whether logs on stderr may use colours: a terminal, and neither `NO_COLOR` (any
/// value) nor `TERM=dumb` set.
pub fn colours() -> bool {
    redraws() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Which of the library's transfer totals a progress line follows.
#[derive(Debug, Clone, Copy)]
pub enum Transfer {
    /// Bytes of snapshot files restored.
    Restored,
    /// Bytes of snapshot files stored.
    Stored,
}

/// Runs `work` with a byte progress line `label` of about `total` bytes, fed by the
/// library's transfer totals (every transfer of this process counts, so the line is an
/// estimate when other transfers run meanwhile). Nothing is drawn when `total` is 0 or
/// stderr cannot redraw a line.
pub fn while_transferring<T>(
    label: &str,
    total: u64,
    which: Transfer,
    work: impl FnOnce() -> T,
) -> T {
    if total == 0 || !redraws() {
        return work();
    }
    let read = move || {
        let (restored, stored) = rockstate::storage::transfer_totals();
        match which {
            Transfer::Restored => restored,
            Transfer::Stored => stored,
        }
    };
    let progress = Progress::bytes(label, total);
    let start = read();
    let done = std::sync::atomic::AtomicBool::new(false);
    // Set however `work` ends (a panic too), so that the drawing thread always stops.
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                progress.set(read().saturating_sub(start).min(total));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let _done = Done(&done);
        work()
    });
    progress.finish();
    result
}
