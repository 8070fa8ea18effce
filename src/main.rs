//! The `rockstate` command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tools for rockstate keyed state.
#[derive(Debug, Parser)]
#[command(name = "rockstate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shows which key group and subtask own a string key.
    ///
    /// Example: rockstate key-group user-42 --max-parallelism 128 --parallelism 4
    KeyGroup {
        /// The key, as a string (hashed in its serialized form).
        key: String,
        /// Number of key groups (1..=32768).
        #[arg(long, default_value_t = 128)]
        max_parallelism: u32,
        /// Number of subtasks (1..=max parallelism).
        #[arg(long, default_value_t = 1)]
        parallelism: u32,
    },
}

fn run(cli: Cli) -> rockstate::Result<()> {
    match cli.command {
        Command::KeyGroup {
            key,
            max_parallelism,
            parallelism,
        } => {
            let kg = rockstate::key_group_for(&key, max_parallelism)?;
            let subtask = rockstate::subtask_for_key_group(kg, parallelism, max_parallelism)?;
            let range =
                rockstate::key_group_range_for_subtask(subtask, parallelism, max_parallelism)?;
            println!("key group {kg} of {max_parallelism}; subtask {subtask} of {parallelism}, which owns {range}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rockstate: {e}");
            ExitCode::from(2)
        }
    }
}
