//! Turns a URL into an object store and a root path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use parking_lot::Mutex;
use url::Url;

use crate::error::{Error, Result};

/// An opened store.
pub(crate) struct Opened {
    pub store: Arc<dyn ObjectStore>,
    pub root: ObjPath,
    pub url: String,
    /// The local directory of a local store.
    pub local_dir: Option<PathBuf>,
    /// Scheme and bucket (or memory store name): equal names reach the same objects.
    pub store_name: String,
}

/// In-memory stores by name, so that every `memory://name` of a process sees the same data.
fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

fn invalid_url(url: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("storage URL {url:?}: {why}"))
}

fn open_local(dir: PathBuf, url: &str, create: bool) -> Result<Opened> {
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("read the current directory", e))?
            .join(dir)
    };
    // Lexically drop `.` components, so that URLs read `file:///a/b`, not `file:///a/./b`.
    let dir: PathBuf = dir.components().collect();
    if create {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    } else if !dir.is_dir() {
        return Err(Error::NotFound(format!("no directory {}", dir.display())));
    }
    let store = LocalFileSystem::new_with_prefix(&dir)
        .map_err(|e| Error::storage("open", url, e))?
        .with_automatic_cleanup(true);
    let shown = format!("file://{}", dir.display());
    Ok(Opened {
        store: Arc::new(store),
        root: ObjPath::default(),
        url: shown,
        local_dir: Some(dir),
        store_name: String::new(),
    })
}

/// Environment variables that configure a cloud store, as lower-case config keys.
fn env_config(prefix: &str) -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

pub(crate) fn open_store(
    url: &str,
    config: Vec<(String, String)>,
    create_local: bool,
) -> Result<Opened> {
    let trimmed = url.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid_url(url, "empty"));
    }
    if !url.contains("://") {
        return open_local(PathBuf::from(trimmed), url, create_local);
    }
    let parsed = Url::parse(trimmed).map_err(|e| invalid_url(url, e))?;
    match parsed.scheme() {
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|()| invalid_url(url, "not an absolute local path"))?;
            open_local(dir, url, create_local)
        }
        "memory" => {
            let name = format!(
                "{}{}",
                parsed.host_str().unwrap_or_default(),
                parsed.path()
            );
            let store = memory_stores()
                .lock()
                .entry(name.clone())
                .or_insert_with(|| Arc::new(InMemory::new()))
                .clone();
            Ok(Opened {
                store,
                root: ObjPath::default(),
                url: trimmed.to_string(),
                local_dir: None,
                store_name: format!("memory://{name}"),
            })
        }
        scheme @ ("s3" | "gs" | "az") => {
            let (feature, built) = match scheme {
                "s3" => ("aws", cfg!(feature = "aws")),
                "gs" => ("gcp", cfg!(feature = "gcp")),
                _ => ("azure", cfg!(feature = "azure")),
            };
            if !built {
                return Err(invalid_url(
                    url,
                    format!("{scheme}:// stores need rockstate's `{feature}` feature, which this build lacks"),
                ));
            }
            let env_prefix = match scheme {
                "s3" => "AWS_",
                "gs" => "GOOGLE_",
                _ => "AZURE_",
            };
            let mut options = env_config(env_prefix);
            options.extend(config);
            let (store, root) = object_store::parse_url_opts(&parsed, options)
                .map_err(|e| Error::storage("open", trimmed, e))?;
            Ok(Opened {
                store: Arc::from(store),
                root,
                url: trimmed.to_string(),
                local_dir: None,
                store_name: format!("{scheme}://{}", parsed.host_str().unwrap_or_default()),
            })
        }
        other => Err(invalid_url(
            url,
            format!("unsupported scheme {other:?} (use a path, file://, s3://, gs://, az:// or memory://)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each cloud scheme opens only with its feature; without it the error names the
    /// feature to enable instead of failing later with an engine message.
    #[test]
    fn cloud_schemes_need_their_feature() {
        let cases = [
            ("s3://bucket/job", "aws", cfg!(feature = "aws")),
            ("gs://bucket/job", "gcp", cfg!(feature = "gcp")),
            ("az://container/job", "azure", cfg!(feature = "azure")),
        ];
        for (url, feature, built) in cases {
            let result = open_store(url, Vec::new(), false);
            if built {
                // Opening builds a client and sends nothing: it may still fail for want
                // of settings, but never for want of the feature.
                if let Err(e) = result {
                    assert!(!e.to_string().contains("feature"), "{url}: {e}");
                }
            } else {
                let e = result.err().expect("opened without the feature");
                assert_eq!(
                    e.kind(),
                    crate::error::ErrorKind::InvalidArgument,
                    "{url}: {e}"
                );
                assert!(
                    e.to_string().contains(&format!("`{feature}` feature")),
                    "{e}"
                );
            }
        }
    }
}
