//! The `rockstate` command-line tool: the demo job, inspection and verification of
//! checkpoints and savepoints, the orphan sweep, and the macro benchmark.

mod args;
mod bench;
mod common;
mod control;
mod demo;
mod format;
mod progress;
mod snapshots;
mod state;
mod status;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use common::{exit, one_line, runtime};
use rockstate::runtime::control::Command as ControlCommand;

/// Every allocation of the process, RocksDB's included, goes to jemalloc: the demo job
/// ran 1.05x faster at parallelism 1 than with the system allocator (medians of three
/// runs in turn), restores in `rockstate bench` about 15% slower (see README).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  nothing to show (`latest` without a completed checkpoint, `status` of a job that
     never ran)
  2  bad input or failure (one line on stderr says why)
  3  `verify` found missing or damaged files (each listed)
  4  `savepoint trigger`, `stop`: no running job answered within --wait
  5  `status`: the status is stale (no live writer: the job's process is gone or was replaced)
  6  storage failed in a way that may pass (unreachable, throttled, timed out): try again
  7  not found: no such directory, bucket, checkpoint, savepoint or file
  130  `demo` ended by a second SIGTERM/SIGINT without waiting for its savepoint

URLs: a plain path, file:///abs/path, s3://bucket/prefix (configured from AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP), gs://, az://.
Logs: RUST_LOG=rockstate=debug for more detail on stderr.";

/// Keyed state in RocksDB with incremental checkpoints and rescalable savepoints.
#[derive(Debug, Parser)]
#[command(name = "rockstate", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the demo job: a keyed event stream counted per key, with incremental
    /// checkpoints; resumable after any crash, at any parallelism.
    #[command(after_help = demo::HELP)]
    Demo(Box<demo::DemoArgs>),
    /// Lists a job's checkpoints: completed ones with their sizes, incomplete ones marked.
    #[command(after_help = "Example: rockstate checkpoints ./rockstate-demo/demo --json")]
    Checkpoints {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        #[command(flatten)]
        output: Output,
    },
    /// Prints the URL of a job's newest completed checkpoint (exit 1 when there is none).
    #[command(
        after_help = "Example: rockstate demo --from \"$(rockstate latest ./rockstate-demo/demo)\" --job-id demo2"
    )]
    Latest {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        #[command(flatten)]
        output: Output,
    },
    /// Shows what a checkpoint or savepoint holds: operators, states, key groups, files.
    #[command(after_help = "Example: rockstate inspect ./rockstate-demo/demo/chk-12")]
    Inspect {
        /// A `chk-N` folder, a savepoint folder, or the `_metadata` inside either.
        snapshot_url: String,
        #[command(flatten)]
        output: Output,
    },
    /// Checks that every file of a checkpoint or savepoint exists with its recorded size
    /// and CRC32 (exit 3 listing every bad file).
    #[command(after_help = "Example: rockstate verify ./rockstate-demo/demo/chk-12")]
    Verify {
        /// A `chk-N` folder, a savepoint folder, or the `_metadata` inside either.
        snapshot_url: String,
        #[command(flatten)]
        output: Output,
    },
    /// Shows what a running job is doing: its writer, the last completed checkpoint,
    /// checkpoints in flight, recent failures with their reasons, durations and bytes
    /// uploaded (exit 5 when the status is stale: no live writer).
    #[command(
        after_help = "Example: rockstate status ./rockstate-demo/demo --watch 2s\n\nThe job's coordinator rewrites <job>/_status.json on every change and every 10 s;\na status not refreshed for 30 s, or written by a replaced writer, is stale."
    )]
    Status {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        /// Shows the status again every interval (e.g. `2s`) until interrupted.
        #[arg(long, value_parser = format::parse_duration, value_name = "INTERVAL")]
        watch: Option<std::time::Duration>,
        #[command(flatten)]
        output: Output,
    },
    /// Savepoint operations.
    #[command(subcommand)]
    Savepoint(SavepointCommand),
    /// Reads the state inside a checkpoint or savepoint, without a job.
    #[command(subcommand)]
    State(StateCommand),
    /// Stops a running job (any process of it, on any machine), after a final savepoint
    /// when `--savepoint` is given, through a request in its checkpoint storage.
    #[command(
        after_help = "Example: rockstate stop ./rockstate-demo/demo --savepoint ./savepoints\n\nPrints the final savepoint's URL. Exit 4 when no job answers within --wait\n(the request is then withdrawn)."
    )]
    Stop {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        /// Parent directory of the final savepoint.
        #[arg(long)]
        savepoint: Option<String>,
        /// Savepoint format.
        #[arg(long, value_enum, default_value = "canonical")]
        format: args::FormatArg,
        /// How long to wait for the job's answer, e.g. `30s`, `2m`.
        #[arg(long, default_value = "60s", value_parser = format::parse_duration)]
        wait: std::time::Duration,
    },
    /// Deletes files of a job directory that no completed checkpoint references and that
    /// are older than the grace period.
    #[command(
        after_help = "Example: rockstate gc s3://bucket/checkpoints/my-job --dry-run --grace 2h\n\nThe grace period must be longer than the checkpoint timeout of a running job:\nfiles of a checkpoint in flight are not referenced yet."
    )]
    Gc {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        /// Lists what would be deleted without deleting it.
        #[arg(long)]
        dry_run: bool,
        /// Minimum age of a deleted file, e.g. `90s`, `30m`, `1h30m`, `1d`.
        #[arg(long, default_value = "1h", value_parser = format::parse_duration)]
        grace: std::time::Duration,
        #[command(flatten)]
        output: Output,
    },
    /// Runs the macro benchmark: state access against raw RocksDB, incremental
    /// checkpoints, restore, rescale and savepoint, each against a baseline of the same run.
    #[command(after_help = bench::HELP)]
    Bench(bench::BenchArgs),
    /// Prints a shell completion script, generated from the command-line definition.
    #[command(
        after_help = "Examples:\n  rockstate completions bash > ~/.local/share/bash-completion/completions/rockstate\n  rockstate completions zsh > \"${fpath[1]}/_rockstate\""
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff), generated from the command-line definition.
    #[command(after_help = "Example: rockstate man > rockstate.1 && man ./rockstate.1")]
    Man,
    /// Shows which key group and subtask own a key.
    #[command(
        after_help = "Examples:\n  rockstate key-group user-42 --max-parallelism 128 --parallelism 4\n  rockstate key-group 1234567 --key-type u64 --parallelism 3\n\nThe key type is the Rust type of the state's key (`rockstate inspect` shows it): the\nkey is hashed in that type's serialized form."
    )]
    KeyGroup {
        /// The key, written as its type reads it (a number for the integer types; JSON
        /// with `--like`).
        #[arg(allow_negative_numbers = true, allow_hyphen_values = true)]
        key: String,
        /// The key's type.
        #[arg(long, value_enum, default_value = "string", conflicts_with = "like")]
        key_type: args::KeyType,
        /// Takes the key type (any type: the key is then JSON), the max parallelism and
        /// the parallelism from state `--state` of operator `--operator` in this
        /// checkpoint or savepoint.
        #[arg(long, value_name = "SNAPSHOT", requires_all = ["operator", "state"])]
        like: Option<String>,
        /// The operator, with `--like`.
        #[arg(long, requires = "like")]
        operator: Option<String>,
        /// The state, with `--like`.
        #[arg(long, requires = "like")]
        state: Option<String>,
        /// Number of key groups (1..=32768; default 128, or the snapshot's).
        #[arg(long)]
        max_parallelism: Option<u32>,
        /// Number of subtasks (1..=max parallelism; default 1, or the snapshot's).
        #[arg(long)]
        parallelism: Option<u32>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum SavepointCommand {
    /// Asks a running job to take a savepoint, through a request in its checkpoint
    /// storage, and prints the savepoint's URL.
    #[command(
        after_help = "Example: rockstate savepoint trigger ./rockstate-demo/demo ./savepoints\n\nExit 2 when the job could not take it (the reason on stderr), 4 when no job answers\nwithin --wait (the request is then withdrawn)."
    )]
    Trigger {
        /// The job directory (`<checkpoint dir>/<job id>`).
        job_url: String,
        /// Parent directory of the new savepoint folder (the job's own default when left
        /// out).
        dir: Option<String>,
        /// Savepoint format.
        #[arg(long, value_enum, default_value = "canonical")]
        format: args::FormatArg,
        /// How long to wait for the job's answer, e.g. `30s`, `2m`.
        #[arg(long, default_value = "60s", value_parser = format::parse_duration)]
        wait: std::time::Duration,
    },
    /// Deletes a savepoint folder; refuses anything that is not a savepoint.
    #[command(
        after_help = "Example: rockstate savepoint dispose ./savepoints/savepoint-demo-1a2b3c4d5e6f"
    )]
    Dispose {
        /// The savepoint folder.
        savepoint_url: String,
    },
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Lists the operators and states of a checkpoint or savepoint: kinds, key, value and
    /// namespace types, time to live, entry counts (every entry is read, into a temporary
    /// local copy) and the bytes of each operator's files.
    #[command(after_help = "Example: rockstate state ls ./savepoints/savepoint-demo-1a2b3c4d5e6f")]
    Ls {
        /// A `chk-N` folder, a savepoint folder, or the `_metadata` inside either.
        snapshot_url: String,
        /// Local directory for the temporary copy of one operator's state (default: a new
        /// temporary directory, removed at the end). It needs room for the largest
        /// operator's state.
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// Prints the entries of one key in a state as JSON lines, decoded through the types
    /// recorded with the state (every namespace and, for map state, every map entry of
    /// the key). Exit 1 when the key has none.
    #[command(
        after_help = "Examples:\n  rockstate state get ./savepoints/savepoint-demo-1a2b --operator counter --state count --key 42\n  rockstate state get SNAPSHOT --operator sessions --state open --key '[\"eu\", 7]'\n\nThe key is JSON (a bare word is taken as a string for a string key): structs are\nobjects, tuples arrays, enums \"Variant\" or {\"Variant\": content}."
    )]
    Get {
        /// A `chk-N` folder, a savepoint folder, or the `_metadata` inside either.
        snapshot_url: String,
        /// The operator's uid.
        #[arg(long)]
        operator: String,
        /// The state's name.
        #[arg(long)]
        state: String,
        /// The key, as JSON.
        #[arg(long, allow_hyphen_values = true)]
        key: String,
        /// Local directory for the temporary copy of the operator's state.
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
    },
    /// Prints every entry of a state as JSON lines, decoded through the types recorded
    /// with the state, streaming (memory stays bounded whatever the state's size).
    #[command(
        after_help = "Example: rockstate state dump ./savepoints/savepoint-demo-1a2b --operator counter --state histogram | head\n\nEach line: {\"key_group\", \"key\", \"namespace\" (unless ()), \"user_key\" (map state),\n\"value\" (an array for list state), \"written_at\" (ms, with a time to live)}."
    )]
    Dump {
        /// A `chk-N` folder, a savepoint folder, or the `_metadata` inside either.
        snapshot_url: String,
        /// The operator's uid.
        #[arg(long)]
        operator: String,
        /// The state's name.
        #[arg(long)]
        state: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: args::DumpFormat,
        /// Stop after this many entries.
        #[arg(long)]
        limit: Option<u64>,
        /// Local directory for the temporary copy of the operator's state.
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
    },
}

/// Output format flags shared by the listing commands.
#[derive(Debug, Clone, Copy, Args)]
struct Output {
    /// Prints one JSON object (the last line of stdout) instead of text.
    #[arg(long)]
    json: bool,
}

fn run(cli: Cli) -> rockstate::Result<u8> {
    match cli.command {
        Command::Demo(args) => demo::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Checkpoints { job_url, output } => {
            runtime()?.block_on(snapshots::checkpoints(&job_url, output.json))
        }
        Command::Latest { job_url, output } => {
            runtime()?.block_on(snapshots::latest(&job_url, output.json))
        }
        Command::Status {
            job_url,
            watch,
            output,
        } => runtime()?.block_on(status::status(&job_url, output.json, watch)),
        Command::Inspect {
            snapshot_url,
            output,
        } => runtime()?.block_on(snapshots::inspect(&snapshot_url, output.json)),
        Command::Verify {
            snapshot_url,
            output,
        } => runtime()?.block_on(snapshots::verify(&snapshot_url, output.json)),
        Command::Savepoint(SavepointCommand::Trigger {
            job_url,
            dir,
            format,
            wait,
        }) => runtime()?.block_on(control::request(
            &job_url,
            ControlCommand::Savepoint {
                dir: args::directory_url(dir)?,
                format: args::savepoint_format(format),
            },
            wait,
        )),
        Command::Stop {
            job_url,
            savepoint,
            format,
            wait,
        } => runtime()?.block_on(control::request(
            &job_url,
            ControlCommand::Stop {
                savepoint_dir: args::directory_url(savepoint)?,
                format: args::savepoint_format(format),
            },
            wait,
        )),
        Command::State(StateCommand::Ls {
            snapshot_url,
            scratch,
            output,
        }) => {
            let scratch = scratch_dir(scratch)?;
            runtime()?.block_on(state::ls(&snapshot_url, output.json, scratch.path()))
        }
        Command::State(StateCommand::Get {
            snapshot_url,
            operator,
            state,
            key,
            scratch,
        }) => {
            let scratch = scratch_dir(scratch)?;
            runtime()?.block_on(state::get(
                &snapshot_url,
                &operator,
                &state,
                &key,
                scratch.path(),
            ))
        }
        Command::State(StateCommand::Dump {
            snapshot_url,
            operator,
            state,
            format: args::DumpFormat::Jsonl,
            limit,
            scratch,
        }) => {
            let scratch = scratch_dir(scratch)?;
            runtime()?.block_on(state::dump(
                &snapshot_url,
                &operator,
                &state,
                limit,
                scratch.path(),
            ))
        }
        Command::Savepoint(SavepointCommand::Dispose { savepoint_url }) => {
            runtime()?.block_on(snapshots::dispose(&savepoint_url))
        }
        Command::Gc {
            job_url,
            dry_run,
            grace,
            output,
        } => runtime()?.block_on(snapshots::gc(&job_url, dry_run, grace, output.json)),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "rockstate", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .and_then(|()| {
                    use std::io::Write;
                    std::io::stdout().write_all(&page)
                })
                .map_err(|e| rockstate::Error::io("write the manual page", e))?;
            Ok(exit::OK)
        }
        Command::KeyGroup {
            key,
            key_type,
            like,
            operator,
            state,
            max_parallelism,
            parallelism,
            output,
        } => {
            let (kg, max_parallelism, parallelism, type_name) = match like {
                Some(url) => {
                    let (operator, state) =
                        (operator.unwrap_or_default(), state.unwrap_or_default());
                    let found = runtime()?
                        .block_on(state::key_group_like(&url, &operator, &state, &key))?;
                    if max_parallelism.is_some_and(|m| m != found.max_parallelism) {
                        return Err(rockstate::Error::invalid(format!(
                            "the snapshot's operator has max parallelism {}",
                            found.max_parallelism
                        )));
                    }
                    (
                        found.key_group,
                        found.max_parallelism,
                        parallelism.unwrap_or(found.parallelism),
                        found.key_type,
                    )
                }
                None => {
                    let max_parallelism = max_parallelism.unwrap_or(128);
                    (
                        key_type.key_group(&key, max_parallelism)?,
                        max_parallelism,
                        parallelism.unwrap_or(1),
                        format!("{key_type:?}").to_lowercase(),
                    )
                }
            };
            let subtask = rockstate::subtask_for_key_group(kg, parallelism, max_parallelism)?;
            let range =
                rockstate::key_group_range_for_subtask(subtask, parallelism, max_parallelism)?;
            if output.json {
                snapshots::print_json(&serde_json::json!({
                    "key": key,
                    "key_type": type_name,
                    "key_group": kg,
                    "max_parallelism": max_parallelism,
                    "subtask": subtask,
                    "parallelism": parallelism,
                    "key_groups": [range.start(), range.end()],
                }));
            } else {
                println!("key group {kg} of {max_parallelism}; subtask {subtask} of {parallelism}, which owns {range}");
            }
            Ok(exit::OK)
        }
    }
}

/// Logs go to stderr, warnings and up unless `RUST_LOG` says otherwise.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(progress::colours())
        .without_time()
        .try_init();
}

/// A clap error as one line: the message without its usage and hints.
fn clap_message(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "a command is required".into();
    }
    let rendered = e.render().to_string();
    let lines: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let message: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("tip:"))
        .collect();
    // clap's tips ("a similar subcommand exists: 'status'") stay, in parentheses.
    let tips: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("tip:"))
        .map(str::trim)
        .collect();
    let text = one_line(&message.join(" "));
    let text = text.trim_start_matches("error: ");
    let text = if text.is_empty() {
        "invalid arguments".to_string()
    } else {
        text.to_string()
    };
    if tips.is_empty() {
        text
    } else {
        format!("{text} ({})", one_line(&tips.join("; ")))
    }
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as for other command-line tools.
    // SAFETY: called before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A bug must still end with one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("rockstate: internal error{at}: {message}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rockstate: {} (see --help)", clap_message(&e));
            return ExitCode::from(exit::ERROR);
        }
    };
    init_logging();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rockstate: {}", one_line(&e.report().to_string()));
            ExitCode::from(exit::for_error(&e))
        }
    }
}

/// A new temporary directory inside `parent` (default: the system's), removed on drop.
fn scratch_dir(parent: Option<std::path::PathBuf>) -> rockstate::Result<tempfile::TempDir> {
    let parent = parent.unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("rockstate-state-")
        .tempdir_in(&parent)
        .map_err(|e| rockstate::Error::io(format!("create a directory in {}", parent.display()), e))
}
