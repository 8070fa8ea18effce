//! A tour of rockstate's keyed state: two subtasks of one job, each with its own RocksDB,
//! keys routed by key group, every state kind, TTL, and a reopen of the local state.
//!
//! Run: `make demo` (or `cargo run --example quickstart`). Pass a directory to keep the
//! state there; by default a temporary directory is used and removed.

use std::time::{Duration, Instant};

use rockstate::{
    AggregateFunction, AggregatingStateDescriptor, BackendOptions, ListStateDescriptor,
    ManualClock, MapStateDescriptor, ReducingStateDescriptor, RocksStateBackend, SharedResources,
    ValueStateDescriptor,
};

const PARALLELISM: u32 = 2;
const MAX_PARALLELISM: u32 = 128;
const EVENTS: u64 = 20_000;
const USERS: u64 = 500;

/// Running mean of event amounts.
struct Mean;

impl AggregateFunction for Mean {
    type In = u64;
    type Acc = (u64, u64);
    type Out = f64;
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, amount: u64, (sum, n): (u64, u64)) -> (u64, u64) {
        (sum + amount, n + 1)
    }
    fn get_result(&self, (sum, n): &(u64, u64)) -> f64 {
        *sum as f64 / *n as f64
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let root = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    let clock = ManualClock::new(1_700_000_000_000);
    // One memory budget for the whole process, shared by both subtasks.
    let resources = SharedResources::new(64 << 20)?;

    let open = |subtask: u32| -> rockstate::Result<RocksStateBackend> {
        let dir = root.join(format!("subtask-{subtask}"));
        let options = BackendOptions::for_subtask(dir, subtask, PARALLELISM, MAX_PARALLELISM)?;
        RocksStateBackend::builder(options)
            .shared_resources(resources.clone())
            .clock(clock.clone())
            .open()
    };

    let backends: Vec<_> = (0..PARALLELISM).map(open).collect::<Result<_, _>>()?;
    println!(
        "rockstate quickstart: {PARALLELISM} subtasks, {MAX_PARALLELISM} key groups, state in {}",
        root.display()
    );
    for (i, b) in backends.iter().enumerate() {
        println!(
            "  subtask {i}: key groups {}, dir {}",
            b.key_group_range(),
            b.local_dir().display()
        );
    }

    let started = Instant::now();
    let mut per_subtask = vec![0u64; backends.len()];
    {
        let handles: Vec<_> = backends
            .iter()
            .map(|b| -> rockstate::Result<_> {
                Ok((
                    b.register(ValueStateDescriptor::<String, u64>::new("count"))?,
                    b.register(ListStateDescriptor::<String, u64>::new("recent"))?,
                    b.register(MapStateDescriptor::<String, u8, u64>::new("histogram"))?,
                    b.register(ReducingStateDescriptor::<String, u64>::new("max", u64::max))?,
                    b.register(AggregatingStateDescriptor::<String, _>::new("mean", Mean))?,
                    b.register(
                        ValueStateDescriptor::<String, u64>::new("last_seen")
                            .with_ttl(Duration::from_secs(60)),
                    )?,
                ))
            })
            .collect::<Result<_, _>>()?;

        // A deterministic event stream: (user, amount).
        let mut x: u64 = 42;
        for event in 0..EVENTS {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let user = format!("user-{}", (x >> 33) % USERS);
            let amount = (x >> 13) % 1_000;
            // Route by key group, exactly as the backend partitions its state.
            let subtask = rockstate::subtask_for_key(&user, PARALLELISM, MAX_PARALLELISM)? as usize;
            per_subtask[subtask] += 1;
            let (count, recent, histogram, max, mean, last_seen) = &handles[subtask];
            let n = count.get(&user)?.unwrap_or(0) + 1;
            count.put(&user, &n)?;
            recent.add(&user, &amount)?;
            let bucket = (amount / 100) as u8;
            let c = histogram.get(&user, &bucket)?.unwrap_or(0);
            histogram.put(&user, &bucket, &(c + 1))?;
            max.add(&user, amount)?;
            mean.add(&user, amount)?;
            last_seen.put(&user, &event)?;
        }

        let probe = "user-7".to_string();
        let s = rockstate::subtask_for_key(&probe, PARALLELISM, MAX_PARALLELISM)? as usize;
        let (count, recent, histogram, max, mean, _) = &handles[s];
        println!(
            "processed {EVENTS} events in {:.2?} ({} on subtask 0, {} on subtask 1)",
            started.elapsed(),
            per_subtask[0],
            per_subtask[1]
        );
        println!(
            "{probe} lives on subtask {s} (key group {}):",
            rockstate::key_group_for(&probe, MAX_PARALLELISM)?
        );
        println!("  count     = {:?}", count.get(&probe)?);
        let list = recent.get(&probe)?;
        println!(
            "  recent    = {} amounts, last 5 {:?}",
            list.len(),
            &list[list.len().saturating_sub(5)..]
        );
        let hist: Vec<_> = histogram.iter(&probe)?.collect::<Result<_, _>>()?;
        println!("  histogram = {hist:?}");
        println!("  max       = {:?}", max.get(&probe)?);
        println!("  mean      = {:.1}", mean.get(&probe)?.unwrap_or(0.0));
        for (i, (count, ..)) in handles.iter().enumerate() {
            println!("  subtask {i} holds {} keys", count.all_keys()?.count());
        }
    }

    // TTL: last_seen values expire 60 s after they were written.
    let live_last_seen = || -> rockstate::Result<usize> {
        let mut live = 0;
        for b in &backends {
            let last_seen = b.register(
                ValueStateDescriptor::<String, u64>::new("last_seen")
                    .with_ttl(Duration::from_secs(60)),
            )?;
            live += last_seen.all_keys()?.count();
        }
        Ok(live)
    };
    clock.advance(Duration::from_secs(30));
    println!(
        "30 s after the stream: {} users have a live last_seen",
        live_last_seen()?
    );
    clock.advance(Duration::from_secs(31));
    println!(
        "61 s after the stream: {} users have a live last_seen (TTL 60 s)",
        live_last_seen()?
    );

    // Close (flushing memtables; there is no write-ahead log) and reopen the same dirs.
    for b in backends {
        b.close()?;
    }
    let reopened: Vec<_> = (0..PARALLELISM).map(open).collect::<Result<_, _>>()?;
    let mut total = 0;
    for b in &reopened {
        let count = b.register(ValueStateDescriptor::<String, u64>::new("count"))?;
        for entry in count.all_keys()? {
            let (user, ()) = entry?;
            total += count.get(&user)?.unwrap_or(0);
        }
        let states: Vec<_> = b
            .states()
            .iter()
            .map(|s| format!("{} ({})", s.name, s.kind))
            .collect();
        println!(
            "reopened {}: states {}",
            b.local_dir().display(),
            states.join(", ")
        );
    }
    println!("sum of counts after reopen = {total} (expected {EVENTS})");
    if total != EVENTS {
        return Err("state lost across reopen".into());
    }
    Ok(())
}
