//! Argument types and conversions shared by several commands.

use clap::ValueEnum;
use rockstate::SavepointFormat;

/// Savepoint formats on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Per key group sections, restorable at any parallelism and into any backend layout.
    Canonical,
    /// The RocksDB files themselves.
    Native,
}

/// A directory argument as a URL the job can use wherever it runs: a relative path is
/// made absolute against this process's working directory.
pub fn directory_url(dir: Option<String>) -> rockstate::Result<Option<String>> {
    match dir {
        Some(dir) if !dir.contains("://") => {
            let absolute = std::path::absolute(&dir)
                .map_err(|e| rockstate::Error::io(format!("resolve {dir}"), e))?;
            Ok(Some(format!("file://{}", absolute.display())))
        }
        other => Ok(other),
    }
}

/// The savepoint format of a `--format` flag.
pub fn savepoint_format(format: FormatArg) -> SavepointFormat {
    match format {
        FormatArg::Canonical => SavepointFormat::Canonical,
        FormatArg::Native => SavepointFormat::Native,
    }
}
