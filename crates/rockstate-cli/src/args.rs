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

/// Key types `rockstate key-group` can hash: the common types of keyed state.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyType {
    /// `String` (and `&str`).
    String,
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `u128`.
    U128,
    /// `bool`.
    Bool,
    /// `char`.
    Char,
}

impl KeyType {
    /// The key group of `key` read as this type.
    ///
    /// Errors: `InvalidArgument` when `key` is not a value of the type.
    pub fn key_group(self, key: &str, max_parallelism: u32) -> rockstate::Result<u16> {
        fn parsed<T: std::str::FromStr>(key: &str, name: &str) -> rockstate::Result<T> {
            key.parse()
                .map_err(|_| rockstate::Error::invalid(format!("{key:?} is not a {name}")))
        }
        let kg = |k: &dyn erased::Key| k.key_group(max_parallelism);
        match self {
            KeyType::String => kg(&key.to_string()),
            KeyType::U32 => kg(&parsed::<u32>(key, "u32")?),
            KeyType::U64 => kg(&parsed::<u64>(key, "u64")?),
            KeyType::I32 => kg(&parsed::<i32>(key, "i32")?),
            KeyType::I64 => kg(&parsed::<i64>(key, "i64")?),
            KeyType::U128 => kg(&parsed::<u128>(key, "u128")?),
            KeyType::Bool => kg(&parsed::<bool>(key, "bool")?),
            KeyType::Char => kg(&parsed::<char>(key, "char")?),
        }
    }
}

mod erased {
    /// A key of some serializable type.
    pub trait Key {
        fn key_group(&self, max_parallelism: u32) -> rockstate::Result<u16>;
    }

    impl<T: serde::Serialize> Key for T {
        fn key_group(&self, max_parallelism: u32) -> rockstate::Result<u16> {
            rockstate::key_group_for(self, max_parallelism)
        }
    }
}

/// Output format of `state dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    /// One JSON object per line.
    Jsonl,
}
