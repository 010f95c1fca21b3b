//! Model bundles: a GGUF model plus a signed manifest, installed into a
//! content-addressed store and activated atomically (see [`store`]).
//!
//! # Bundle file
//!
//! A bundle travels as one uncompressed tar file (`*.slmdb`) holding:
//!
//! ```text
//! manifest.toml          name, version, model_sha256, model_size, licence,
//!                        prompt_format, min_slmd (see [`BundleManifest`])
//! manifest.toml.minisig  minisign signature of manifest.toml (optional when
//!                        the config allows unsigned bundles)
//! model.gguf             the model; its size and sha256 are in the manifest
//! ```
//!
//! The signature covers the manifest, and the manifest pins the model's
//! sha256, so a verified manifest authenticates the model. Classification
//! heads are trained on the device from the task examples and cached by
//! the model's sha256, so a bundle needs no model-specific artefacts.
//!
//! # Verification ([`verify_staged`])
//!
//! Before llama.cpp opens anything: the manifest parses; the signature
//! verifies against a trusted key (or the bundle is unsigned and unsigned
//! bundles are allowed); `min_slmd` is not newer than this slmd; the model
//! has the manifest's size (a shorter file is "truncated") and sha256; its
//! GGUF header is sane (magic, version 2 or 3, plausible tensor and
//! metadata counts). Free disk and version order are checked by the store.

pub mod canary;
pub mod control;
pub mod sign;
pub mod source;
pub mod store;
pub mod transfer;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use slmd_engine::models::PromptFormat;

pub const MANIFEST: &str = "manifest.toml";
pub const SIGNATURE: &str = "manifest.toml.minisig";
pub const MODEL: &str = "model.gguf";

/// Why an update was refused or failed; `reason()` is the short code
/// published on the status topic.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("not a bundle: {0}")]
    NotBundle(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("the bundle is unsigned and [updates] allow_unsigned is false")]
    Unsigned,
    #[error("signature: {0}")]
    BadSignature(String),
    #[error("model is {actual} bytes, the manifest says {expected}: truncated")]
    Truncated { expected: u64, actual: u64 },
    #[error("model is {actual} bytes, the manifest says {expected}")]
    WrongSize { expected: u64, actual: u64 },
    #[error("model sha256 is {actual}, the manifest says {expected}")]
    ShaMismatch { expected: String, actual: String },
    #[error("model is not a usable GGUF file: {0}")]
    NotGguf(String),
    #[error("bundle needs slmd {needed} or later; this is {running}")]
    TooNew { needed: String, running: String },
    #[error("version {offered} is older than the active {active} (use --force to install it)")]
    Downgrade { offered: String, active: String },
    #[error("version {0} is already installed with different content")]
    VersionReused(String),
    #[error("{needed} bytes are needed and {free} are free in {dir}")]
    DiskFull {
        needed: u64,
        free: u64,
        dir: PathBuf,
    },
    #[error("no bundle with version or id {0}")]
    Unknown(String),
    #[error("nothing to roll back to")]
    NoPrevious,
    #[error("download {url}: {reason}")]
    Download { url: String, reason: String },
    #[error("canary failed: {0}")]
    Canary(String),
    #[error("another update is in progress (lock {0})")]
    Busy(PathBuf),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the request is unsigned and [updates] requires signed requests")]
    UnsignedRequest,
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("request sequence number {seq} is not above {last}, the last accepted (a replay?)")]
    Replayed { seq: u64, last: u64 },
    #[error("larger than the {limit} bytes allowed: {what}")]
    TooLarge { limit: u64, what: String },
}

impl BundleError {
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::Io { .. } => "io",
            BundleError::NotBundle(_) => "not_a_bundle",
            BundleError::Manifest(_) => "bad_manifest",
            BundleError::Unsigned => "unsigned",
            BundleError::BadSignature(_) => "bad_signature",
            BundleError::Truncated { .. } => "truncated",
            BundleError::WrongSize { .. } => "wrong_size",
            BundleError::ShaMismatch { .. } => "sha256_mismatch",
            BundleError::NotGguf(_) => "not_gguf",
            BundleError::TooNew { .. } => "needs_newer_slmd",
            BundleError::Downgrade { .. } => "downgrade",
            BundleError::VersionReused(_) => "version_reused",
            BundleError::DiskFull { .. } => "disk_full",
            BundleError::Unknown(_) => "unknown_bundle",
            BundleError::NoPrevious => "no_previous",
            BundleError::Download { .. } => "download_failed",
            BundleError::Canary(_) => "canary_failed",
            BundleError::Busy(_) => "busy",
            BundleError::BadRequest(_) => "bad_request",
            BundleError::UnsignedRequest => "unsigned",
            BundleError::NotAllowed(_) => "not_allowed",
            BundleError::Replayed { .. } => "replayed",
            BundleError::TooLarge { .. } => "too_large",
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>, source: io::Error) -> BundleError {
    BundleError::Io {
        what: what.into(),
        source,
    }
}

/// `manifest.toml` of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub name: String,
    /// Dotted numbers, e.g. `1.4.0`; compared number by number.
    pub version: String,
    pub model_sha256: String,
    pub model_size: u64,
    pub licence: String,
    pub prompt_format: PromptFormat,
    /// The oldest slmd that can run this bundle.
    #[serde(default = "default_min_slmd")]
    pub min_slmd: String,
}

fn default_min_slmd() -> String {
    "0.1.0".into()
}

impl BundleManifest {
    pub fn parse(text: &str) -> Result<BundleManifest, BundleError> {
        let m: BundleManifest =
            toml::from_str(text).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if m.name.is_empty() || m.name.len() > 64 {
            return Err(BundleError::Manifest(
                "name must be 1 to 64 characters".into(),
            ));
        }
        Version::parse(&m.version)?;
        Version::parse(&m.min_slmd)?;
        if m.model_sha256.len() != 64 || !m.model_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BundleError::Manifest(
                "model_sha256 must be 64 hex digits".into(),
            ));
        }
        Ok(BundleManifest {
            model_sha256: m.model_sha256.to_ascii_lowercase(),
            ..m
        })
    }
}

/// A dotted version, compared number by number (`1.10` > `1.9`; missing
/// parts are 0).
#[derive(Debug, Clone)]
pub struct Version(Vec<u64>);

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

impl Version {
    pub fn parse(s: &str) -> Result<Version, BundleError> {
        let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse).collect();
        match parts {
            Ok(p) if !p.is_empty() && p.len() <= 4 => Ok(Version(p)),
            _ => Err(BundleError::Manifest(format!(
                "version {s:?} is not dotted numbers like 1.2.0"
            ))),
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let n = self.0.len().max(other.0.len());
        let at = |v: &Version, i: usize| v.0.get(i).copied().unwrap_or(0);
        (0..n)
            .map(|i| at(self, i).cmp(&at(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

/// What verification needs from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// minisign public keys (the base64 line of a `.pub` file).
    pub keys: Vec<String>,
    pub allow_unsigned: bool,
}

/// A bundle unpacked into a directory and verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub dir: PathBuf,
    pub manifest: BundleManifest,
    /// sha256 of `manifest.toml`'s bytes: the bundle's id in the store.
    pub id: String,
    pub signed: bool,
}

/// Unpacks bundle file `file` into the empty directory `dir`. Only the
/// three known members are taken; anything else (or a link, or a path
/// outside `dir`) makes it not a bundle.
pub fn unpack(file: &Path, dir: &Path) -> Result<(), BundleError> {
    let f = File::open(file).map_err(|e| io_err(format!("opening {}", file.display()), e))?;
    let mut archive = tar::Archive::new(f);
    let entries = archive
        .entries()
        .map_err(|e| BundleError::NotBundle(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::NotBundle(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| BundleError::NotBundle(e.to_string()))?
            .into_owned();
        let name = path.to_str().unwrap_or("");
        if !entry.header().entry_type().is_file() || ![MANIFEST, SIGNATURE, MODEL].contains(&name) {
            return Err(BundleError::NotBundle(format!(
                "unexpected member {}",
                path.display()
            )));
        }
        let dest = dir.join(name);
        let mut out =
            File::create(&dest).map_err(|e| io_err(format!("writing {}", dest.display()), e))?;
        io::copy(&mut entry, &mut out)
            .map_err(|e| BundleError::NotBundle(format!("reading {name}: {e}")))?;
        out.sync_all()
            .map_err(|e| io_err(format!("syncing {}", dest.display()), e))?;
    }
    for need in [MANIFEST, MODEL] {
        if !dir.join(need).exists() {
            return Err(BundleError::NotBundle(format!("no {need}")));
        }
    }
    Ok(())
}

/// Writes a bundle file from a manifest, an optional signature and a model.
pub fn pack(
    out: &Path,
    manifest: &str,
    signature: Option<&str>,
    model: &Path,
) -> Result<(), BundleError> {
    let tmp = out.with_extension("tmp");
    let f = File::create(&tmp).map_err(|e| io_err(format!("creating {}", tmp.display()), e))?;
    let mut b = tar::Builder::new(f);
    let add = |b: &mut tar::Builder<File>, name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes)
    };
    let w = |e| io_err(format!("writing {}", tmp.display()), e);
    add(&mut b, MANIFEST, manifest.as_bytes()).map_err(w)?;
    if let Some(sig) = signature {
        add(&mut b, SIGNATURE, sig.as_bytes()).map_err(w)?;
    }
    b.append_path_with_name(model, MODEL).map_err(w)?;
    b.into_inner().map_err(w)?;
    slmd_core::fsutil::commit(&tmp, out)
        .map_err(|e| io_err(format!("renaming {}", tmp.display()), e))
}

/// Verifies an unpacked bundle in `dir` (see the module doc).
pub fn verify_staged(dir: &Path, trust: &Trust) -> Result<Verified, BundleError> {
    let manifest_bytes =
        std::fs::read(dir.join(MANIFEST)).map_err(|e| io_err("reading manifest.toml", e))?;
    let text = std::str::from_utf8(&manifest_bytes)
        .map_err(|_| BundleError::Manifest("not UTF-8".into()))?;
    let signed = match std::fs::read_to_string(dir.join(SIGNATURE)) {
        Ok(sig) => {
            sign::verify(&manifest_bytes, &sig, &trust.keys)?;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !trust.allow_unsigned {
                return Err(BundleError::Unsigned);
            }
            false
        }
        Err(e) => return Err(io_err("reading manifest.toml.minisig", e)),
    };
    let manifest = BundleManifest::parse(text)?;
    // The workspace shares one version: this is the daemon's.
    let running = env!("CARGO_PKG_VERSION");
    if Version::parse(&manifest.min_slmd)? > Version::parse(running)? {
        return Err(BundleError::TooNew {
            needed: manifest.min_slmd.clone(),
            running: running.into(),
        });
    }
    let model = dir.join(MODEL);
    let actual = std::fs::metadata(&model)
        .map_err(|e| io_err("reading model.gguf", e))?
        .len();
    if actual < manifest.model_size {
        return Err(BundleError::Truncated {
            expected: manifest.model_size,
            actual,
        });
    }
    if actual != manifest.model_size {
        return Err(BundleError::WrongSize {
            expected: manifest.model_size,
            actual,
        });
    }
    let sha =
        slmd_engine::models::sha256_file(&model).map_err(|e| io_err("hashing model.gguf", e))?;
    if sha != manifest.model_sha256 {
        return Err(BundleError::ShaMismatch {
            expected: manifest.model_sha256.clone(),
            actual: sha,
        });
    }
    check_gguf_header(&model)?;
    use sha2::Digest;
    Ok(Verified {
        dir: dir.to_path_buf(),
        id: hex::encode(sha2::Sha256::digest(&manifest_bytes)),
        manifest,
        signed,
    })
}

/// GGUF magic, a known version (2 or 3), and tensor and metadata counts a
/// real model could have.
pub fn check_gguf_header(path: &Path) -> Result<(), BundleError> {
    let mut head = [0u8; 24];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|_| BundleError::NotGguf("shorter than a GGUF header".into()))?;
    if &head[..4] != b"GGUF" {
        return Err(BundleError::NotGguf(format!(
            "starts with {:?}, not \"GGUF\"",
            String::from_utf8_lossy(&head[..4])
        )));
    }
    let version = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let tensors = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let kvs = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    if !(2..=3).contains(&version) {
        return Err(BundleError::NotGguf(format!("GGUF version {version}")));
    }
    if tensors == 0 || tensors > 1_000_000 || kvs > 100_000 {
        return Err(BundleError::NotGguf(format!(
            "{tensors} tensors and {kvs} metadata keys"
        )));
    }
    Ok(())
}

/// Test hook: `SLMD_FAULT_KILL_AT=<step>` kills the process with SIGKILL
/// when an update reaches `step` (`downloaded`, `unpacked`, `verified`,
/// `installed`, `canary`, `pointer-written`, `activated`), so tests can
/// check what each crash leaves (test builds only: `slmd_core::fault`).
pub fn fault(step: &str) {
    slmd_core::fault::kill_if("SLMD_FAULT_KILL_AT", step);
}

#[cfg(test)]
mod tests;
