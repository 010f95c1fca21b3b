//! The bundle store under `<state>/bundles`, and the pointer that names the
//! active bundle.
//!
//! ```text
//! <state>/bundles/
//!     <id>/manifest.toml, manifest.toml.minisig, model.gguf
//!                     one installed bundle; id = sha256 of its manifest
//!     .staging/<n>/   a bundle being downloaded, unpacked or verified
//!     current.json    the pointer: active id, previously active ids (newest
//!                     first), the trial of a new activation, the last attempt
//!     .lock           flock held by whoever changes the store
//! ```
//!
//! What a crash at each step leaves:
//! - during download, unpack or verification: files under `.staging/`,
//!   removed at the next [`BundleStore::open`]; the pointer is untouched;
//! - after the staged directory is renamed to `<id>/` and before the pointer
//!   is written: an installed bundle that is not active (it can be
//!   activated later or is collected);
//! - during the pointer write: the old pointer (the new one is written to
//!   `current.json.tmp`, fsynced, renamed over `current.json`, and the
//!   directory fsynced; a rename is atomic);
//! - after the pointer write: the new bundle is active, on trial; the next
//!   start counts the start, and too many starts without the trial being
//!   confirmed roll back to the previous bundle ([`BundleStore::on_start`]).
//!
//! A bundle that the pointer names (active or kept for rollback) is never
//! deleted; [`BundleStore::collect`] removes the rest.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, BundleError, BundleManifest, Trust, Verified, Version};

/// `current.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    /// The active bundle; none means the model named in `[model]`.
    pub active: Option<String>,
    /// Bundles active before, newest first (none = the `[model]` model).
    #[serde(default)]
    pub history: Vec<Option<String>>,
    /// Set when a bundle is activated; cleared once it ran healthy.
    pub trial: Option<Trial>,
    /// The last update attempt and how it ended.
    pub last: Option<Attempt>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: String,
    pub since_ms: u64,
    /// Daemon starts with this bundle active while on trial.
    pub starts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    pub version: Option<String>,
    /// `installed`, `activated`, `refused`, `rolled_back`.
    pub outcome: String,
    pub reason: String,
}

/// One installed bundle.
#[derive(Debug, Clone)]
pub struct Installed {
    pub id: String,
    pub manifest: BundleManifest,
    pub dir: PathBuf,
}

impl Installed {
    pub fn model(&self) -> PathBuf {
        self.dir.join(super::MODEL)
    }
}

/// A handle on the store (its root); cheap to clone.
#[derive(Clone)]
pub struct BundleStore {
    root: PathBuf,
}

/// Held while the store changes; released on drop.
pub struct StoreLock {
    _flock: nix::fcntl::Flock<File>,
}

use slmd_core::now_ms;

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(format!("syncing {}", dir.display()), e))
}

impl BundleStore {
    /// Opens (creating) the store and removes what crashed updates staged,
    /// unless an update is running now.
    pub fn open(state_dir: &Path) -> Result<BundleStore, BundleError> {
        let root = state_dir.join("bundles");
        let staging = root.join(".staging");
        std::fs::create_dir_all(&staging)
            .map_err(|e| io_err(format!("creating {}", staging.display()), e))?;
        let store = BundleStore { root };
        if let Ok(_lock) = store.lock() {
            if let Ok(entries) = std::fs::read_dir(&staging) {
                for e in entries.flatten() {
                    // Partial downloads are kept so they can resume.
                    let path = e.path();
                    if path.extension().is_some_and(|x| x == "part") {
                        continue;
                    }
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn staging(&self) -> PathBuf {
        self.root.join(".staging")
    }

    /// Takes the store's lock, or says who is busy.
    pub fn lock(&self) -> Result<StoreLock, BundleError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(format!("opening {}", path.display()), e))?;
        let flock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map_err(|_| BundleError::Busy(path.clone()))?;
        Ok(StoreLock { _flock: flock })
    }

    pub fn pointer(&self) -> Result<Pointer, BundleError> {
        let path = self.root.join("current.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io_err(
                    format!("reading {}", path.display()),
                    std::io::Error::other(e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pointer::default()),
            Err(e) => Err(io_err(format!("reading {}", path.display()), e)),
        }
    }

    /// Replaces the pointer atomically (write, fsync, rename, fsync dir).
    pub fn write_pointer(&self, p: &Pointer) -> Result<(), BundleError> {
        let tmp = self.root.join("current.json.tmp");
        let path = self.root.join("current.json");
        let bytes = serde_json::to_vec_pretty(p).expect("a pointer serializes");
        let mut f =
            File::create(&tmp).map_err(|e| io_err(format!("writing {}", tmp.display()), e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err(format!("writing {}", tmp.display()), e))?;
        crate::fault("pointer-written");
        slmd_core::fsutil::commit(&tmp, &path)
            .map_err(|e| io_err(format!("renaming {}", tmp.display()), e))
    }

    /// Every installed bundle, oldest version first.
    pub fn list(&self) -> Result<Vec<Installed>, BundleError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| io_err(format!("reading {}", self.root.display()), e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() != 64 || !e.path().is_dir() {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(e.path().join(super::MANIFEST)) else {
                continue;
            };
            if let Ok(manifest) = BundleManifest::parse(&text) {
                out.push(Installed {
                    id: name,
                    manifest,
                    dir: e.path(),
                });
            }
        }
        out.sort_by_key(|b| Version::parse(&b.manifest.version).ok());
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Installed, BundleError> {
        self.list()?
            .into_iter()
            .find(|b| b.id == id)
            .ok_or_else(|| BundleError::Unknown(id.to_owned()))
    }

    /// A bundle named by version or by (a prefix of at least 8 of) its id.
    pub fn find(&self, what: &str) -> Result<Installed, BundleError> {
        let all = self.list()?;
        let by_version = all.iter().filter(|b| b.manifest.version == what);
        let by_id = all
            .iter()
            .filter(|b| what.len() >= 8 && b.id.starts_with(what));
        let found: Vec<&Installed> = by_version.chain(by_id).collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(BundleError::Unknown(what.to_owned())),
        }
    }

    /// The active bundle, if any.
    pub fn active(&self) -> Result<Option<Installed>, BundleError> {
        match self.pointer()?.active {
            Some(id) => self.get(&id).map(Some),
            None => Ok(None),
        }
    }

    /// Moves a verified staged bundle into the store (after the free-space
    /// and version checks). Installing the same bundle again is a no-op.
    pub fn install(
        &self,
        v: &Verified,
        force: bool,
        reserve: u64,
    ) -> Result<Installed, BundleError> {
        let dest = self.root.join(&v.id);
        if dest.exists() {
            let _ = std::fs::remove_dir_all(&v.dir);
            return self.get(&v.id);
        }
        let offered = Version::parse(&v.manifest.version)?;
        for b in self.list()? {
            if b.manifest.name == v.manifest.name && b.manifest.version == v.manifest.version {
                return Err(BundleError::VersionReused(v.manifest.version.clone()));
            }
        }
        if let Some(active) = self.active()? {
            if !force && offered < Version::parse(&active.manifest.version)? {
                return Err(BundleError::Downgrade {
                    offered: v.manifest.version.clone(),
                    active: active.manifest.version,
                });
            }
        }
        // Staging and store share a file system: the rename moves nothing,
        // but what stays free must cover the reserve.
        let free = free_bytes(&self.root)?;
        if free < reserve {
            return Err(BundleError::DiskFull {
                needed: reserve,
                free,
                dir: self.root.clone(),
            });
        }
        std::fs::rename(&v.dir, &dest)
            .map_err(|e| io_err(format!("moving {} into the store", v.dir.display()), e))?;
        sync_dir(&self.root)?;
        crate::fault("installed");
        self.get(&v.id)
    }

    /// Makes `id` active (on trial); the previously active one is kept for
    /// rollback.
    pub fn activate(&self, id: &str, version: &str) -> Result<(), BundleError> {
        let mut p = self.pointer()?;
        if p.active.as_deref() == Some(id) {
            return Ok(());
        }
        let old = p.active.take();
        p.history.retain(|h| h.as_deref() != Some(id));
        p.history.insert(0, old);
        p.active = Some(id.to_owned());
        p.trial = Some(Trial {
            id: id.to_owned(),
            since_ms: now_ms(),
            starts: 0,
        });
        p.last = Some(attempt(Some(version), "activated", ""));
        self.write_pointer(&p)
    }

    /// Makes the previously active bundle active again.
    pub fn rollback(&self, reason: &str) -> Result<Option<String>, BundleError> {
        let mut p = self.pointer()?;
        if p.history.is_empty() {
            return Err(BundleError::NoPrevious);
        }
        let version = p
            .active
            .as_deref()
            .and_then(|id| self.get(id).ok())
            .map(|b| b.manifest.version);
        p.active = p.history.remove(0);
        p.trial = None;
        p.last = Some(attempt(version.as_deref(), "rolled_back", reason));
        self.write_pointer(&p)?;
        Ok(p.active)
    }

    /// Records an attempt that did not change the active bundle.
    pub fn record(
        &self,
        version: Option<&str>,
        outcome: &str,
        reason: &str,
    ) -> Result<(), BundleError> {
        let mut p = self.pointer()?;
        p.last = Some(attempt(version, outcome, reason));
        self.write_pointer(&p)
    }

    /// At daemon start: counts a start of a bundle on trial, and rolls back
    /// when it has started more than `max_starts` times without its trial
    /// being confirmed (a crash loop). Returns the rollback's reason.
    pub fn on_start(&self, max_starts: u32) -> Result<Option<String>, BundleError> {
        let mut p = self.pointer()?;
        let Some(trial) = &mut p.trial else {
            return Ok(None);
        };
        trial.starts += 1;
        if trial.starts > max_starts {
            let why = format!(
                "crash loop: {} starts without {} running healthy",
                trial.starts - 1,
                trial.id
            );
            self.rollback(&why)?;
            return Ok(Some(why));
        }
        self.write_pointer(&p)?;
        Ok(None)
    }

    /// The bundle on trial ran healthy: it stays.
    pub fn confirm(&self, id: &str) -> Result<bool, BundleError> {
        let mut p = self.pointer()?;
        if p.trial.as_ref().is_none_or(|t| t.id != id) {
            return Ok(false);
        }
        p.trial = None;
        self.write_pointer(&p)?;
        Ok(true)
    }

    /// Deletes installed bundles that are neither active nor among the
    /// `keep` newest kept for rollback. Returns the ids removed.
    pub fn collect(&self, keep: usize) -> Result<Vec<String>, BundleError> {
        let p = self.pointer()?;
        let mut wanted: Vec<&str> = p.active.iter().map(String::as_str).collect();
        wanted.extend(p.history.iter().flatten().take(keep).map(String::as_str));
        let mut removed = Vec::new();
        for b in self.list()? {
            if !wanted.contains(&b.id.as_str()) {
                std::fs::remove_dir_all(&b.dir)
                    .map_err(|e| io_err(format!("removing {}", b.dir.display()), e))?;
                removed.push(b.id);
            }
        }
        // Ids no longer installed leave the history too.
        let mut p = p;
        let before = p.history.len();
        p.history
            .retain(|h| !h.as_ref().is_some_and(|id| removed.contains(id)));
        if p.history.len() != before {
            self.write_pointer(&p)?;
        }
        Ok(removed)
    }
}

fn attempt(version: Option<&str>, outcome: &str, reason: &str) -> Attempt {
    Attempt {
        at_ms: now_ms(),
        version: version.map(str::to_owned),
        outcome: outcome.into(),
        reason: reason.into(),
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
pub fn free_bytes(dir: &Path) -> Result<u64, BundleError> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        io_err(
            format!("statvfs {}", dir.display()),
            std::io::Error::from_raw_os_error(e as i32),
        )
    })?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Unpacks and verifies bundle file `file` in a fresh staging directory,
/// then installs it. `reserve` is the free space that must remain.
pub fn install_file(
    store: &BundleStore,
    file: &Path,
    trust: &Trust,
    force: bool,
    reserve: u64,
) -> Result<Installed, BundleError> {
    let size = std::fs::metadata(file)
        .map_err(|e| io_err(format!("reading {}", file.display()), e))?
        .len();
    let free = free_bytes(store.root())?;
    if free < size.saturating_add(reserve) {
        return Err(BundleError::DiskFull {
            needed: size.saturating_add(reserve),
            free,
            dir: store.root().to_path_buf(),
        });
    }
    let dir = store
        .staging()
        .join(format!("{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    let result = super::unpack(file, &dir)
        .and_then(|()| {
            crate::fault("unpacked");
            super::verify_staged(&dir, trust)
        })
        .and_then(|v| {
            crate::fault("verified");
            store.install(&v, force, reserve)
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
