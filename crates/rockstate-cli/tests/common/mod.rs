//! Helpers shared by the command-line tests: one runner of the `rockstate` binary.
#![allow(dead_code)]

use std::process::{Command, ExitStatus, Stdio};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rockstate");

/// Extra environment variables for a child process.
pub type Env<'a> = &'a [(&'a str, &'a str)];

/// No extra environment variables.
pub const NO_ENV: Env<'static> = &[];

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// A finished child process.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Everything about the run, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The last non-empty line of stdout, parsed as JSON.
    pub fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no output\n{}", self.context()));
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e})\n{}", self.context()))
    }

    /// Asserts exit code `code`, failing with the whole output.
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit\n{}",
            self.context()
        );
        self
    }

    /// stdout without surrounding whitespace.
    pub fn line(&self) -> &str {
        self.stdout.trim()
    }
}

pub fn command<S: AsRef<str>>(args: &[S], env: Env) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args.iter().map(|a| a.as_ref()))
        .env_remove("RUST_LOG")
        .env_remove("ROCKSTATE_CRASH_AT")
        // A panic must not print a backtrace even when one is asked for.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Asserts that stderr shows no sign of a panic.
pub fn assert_no_panic(stderr: &str, context: &str) {
    for sign in [
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "internal error",
    ] {
        assert!(
            !stderr.contains(sign),
            "stderr contains {sign:?}\n{context}"
        );
    }
}

impl Run {
    /// A finished child's output, with `stderr` when it was read separately; fails the
    /// test when stderr shows a panic.
    pub fn from_output(output: std::process::Output, stderr: Option<String>) -> Self {
        let run = Self::unchecked(output, stderr);
        assert_no_panic(&run.stderr, &run.context());
        run
    }

    /// A finished child's output, without the panic check: for a process whose peer was
    /// killed under it, where the runtime's own threads may panic.
    pub fn unchecked(output: std::process::Output, stderr: Option<String>) -> Self {
        Run {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: stderr.unwrap_or_else(|| String::from_utf8_lossy(&output.stderr).into_owned()),
        }
    }
}

pub fn run_env<S: AsRef<str>>(args: &[S], env: Env) -> Run {
    let output = command(args, env)
        .output()
        .expect("cannot start the rockstate binary");
    Run::from_output(output, None)
}

pub fn run<S: AsRef<str>>(args: &[S]) -> Run {
    run_env(args, NO_ENV)
}
