//! Running the `rockstate` binary as a child process.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rockstate");

/// Runs `rockstate args` with `env` added (and no inherited `RUST_LOG` or crash
/// schedule); fails the test when stderr shows a panic.
pub fn rockstate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("ROCKSTATE_CRASH_AT")
        .stdin(Stdio::null());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().expect("cannot start the rockstate binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{args:?}: {stderr}"
    );
    out
}

/// Everything about a finished run, for assertion messages.
pub fn context(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last non-empty line of stdout, parsed as JSON.
pub fn last_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output\n{}", context(out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", context(out)))
}
