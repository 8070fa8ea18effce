//! `rockstate bench`: the macro benchmark.

use clap::Args;

pub const HELP: &str = "";

/// Flags of `rockstate bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// State size in MiB.
    #[arg(long, default_value_t = 256)]
    state_mib: u64,
    /// Prints one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(_args: BenchArgs) -> rockstate::Result<u8> {
    Err(rockstate::Error::Internal("not yet".into()))
}
