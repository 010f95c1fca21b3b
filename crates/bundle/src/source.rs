//! Where a bundle comes from: a local file, or an http(s) URL downloaded
//! into the store's staging area. A download that breaks off resumes where
//! it stopped (an HTTP range request) on the next attempt, also after a
//! restart: the partial file is kept under `.staging/<hash of URL>.part`.
//! A download that fails for good deletes its partial file.
//!
//! A source named over MQTT ([`Network`]) is held to the `[updates]`
//! rules: an URL must start with one of `url_prefixes` (none by default)
//! and is fetched without following redirects; a local path must lie under
//! `source_dir` (none by default). Every download stops at a byte limit.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::{io_err, BundleError};

/// A bundle file ready to unpack, and whether it is a download (to delete
/// once installed).
pub struct Fetched {
    pub path: PathBuf,
    pub downloaded: bool,
}

/// What a source named over the network may be.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// URL prefixes allowed; none allows no URL.
    pub url_prefixes: Vec<String>,
    /// Local sources must lie under this directory; none allows none.
    pub source_dir: Option<PathBuf>,
}

impl Network {
    /// Refuses a source these rules do not allow.
    pub fn check(&self, source: &str) -> Result<(), BundleError> {
        let no = |m: String| Err(BundleError::NotAllowed(m));
        if is_url(source) {
            // `..`, a backslash or user info could make a URL that starts
            // with an allowed prefix lead somewhere else.
            let authority_end = source[8..].find('/').map_or(source.len(), |i| i + 8);
            if source.contains("..")
                || source.contains('\\')
                || source[..authority_end].contains('@')
                || source.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return no(format!("{source:?} is not a plain URL"));
            }
            if !self.url_prefixes.iter().any(|p| source.starts_with(p)) {
                return no(format!(
                    "{source:?} does not start with one of [updates] url_prefixes ({})",
                    if self.url_prefixes.is_empty() {
                        "none are configured".to_owned()
                    } else {
                        self.url_prefixes.join(", ")
                    }
                ));
            }
            return Ok(());
        }
        let Some(dir) = &self.source_dir else {
            return no(
                "local paths are not accepted over MQTT ([updates] source_dir is not set)".into(),
            );
        };
        let path = Path::new(source.strip_prefix("file://").unwrap_or(source));
        let (Ok(path), Ok(dir)) = (path.canonicalize(), dir.canonicalize()) else {
            return Err(BundleError::NotBundle(format!("{source} is not a file")));
        };
        if !path.starts_with(&dir) {
            return no(format!(
                "{} is not under [updates] source_dir {}",
                path.display(),
                dir.display()
            ));
        }
        Ok(())
    }
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Resolves `source` (a path, `file://PATH` or an http(s) URL). A download
/// stops beyond `max_bytes`; `network` fetches without redirects.
pub fn fetch(
    source: &str,
    staging: &Path,
    max_bytes: u64,
    network: bool,
) -> Result<Fetched, BundleError> {
    if is_url(source) {
        let path = download(source, staging, max_bytes, network)?;
        super::fault("downloaded");
        return Ok(Fetched {
            path,
            downloaded: true,
        });
    }
    let path = PathBuf::from(source.strip_prefix("file://").unwrap_or(source));
    if !path.is_file() {
        return Err(BundleError::NotBundle(format!(
            "{} is not a file",
            path.display()
        )));
    }
    Ok(Fetched {
        path,
        downloaded: false,
    })
}

const ATTEMPTS: u32 = 5;

fn download(
    url: &str,
    staging: &Path,
    max_bytes: u64,
    network: bool,
) -> Result<PathBuf, BundleError> {
    let name = hex::encode(&sha2::Sha256::digest(url.as_bytes())[..8]);
    let part = staging.join(format!("{name}.part"));
    let result = download_to(url, &part, max_bytes, network);
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

fn download_to(
    url: &str,
    part: &Path,
    max_bytes: u64,
    network: bool,
) -> Result<PathBuf, BundleError> {
    let done = part.with_extension("slmdb");
    let agent = if network {
        // A redirect could lead anywhere, past the allowed prefixes.
        slmd_engine::models::agent_builder().redirects(0).build()
    } else {
        slmd_engine::models::new_agent()
    };
    let too_large = |what: String| BundleError::TooLarge {
        limit: max_bytes,
        what,
    };
    let fail = |reason: String| BundleError::Download {
        url: url.to_owned(),
        reason,
    };
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(500 * u64::from(attempt)));
        }
        let mut out = File::options()
            .create(true)
            .append(false)
            .truncate(false)
            .write(true)
            .open(part)
            .map_err(|e| io_err(format!("opening {}", part.display()), e))?;
        let mut have = out
            .seek(SeekFrom::End(0))
            .map_err(|e| io_err("seeking the partial download", e))?;
        let mut req = agent.get(url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The partial file is already whole.
            Err(ureq::Error::Status(416, _)) if have > 0 => break,
            Err(ureq::Error::Status(code, _)) if (300..500).contains(&code) => {
                return Err(fail(format!("HTTP {code}")))
            }
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        if resp.status() == 200 && have > 0 {
            // The server ignored the range: start over.
            out.set_len(0)
                .and_then(|()| out.seek(SeekFrom::Start(0)).map(|_| ()))
                .map_err(|e| io_err("restarting the download", e))?;
            have = 0;
        }
        if (300..400).contains(&resp.status()) {
            return Err(fail(format!(
                "HTTP {} (redirects are not followed)",
                resp.status()
            )));
        }
        let total: Option<u64> = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse().ok());
        if let Some(t) = total {
            if have.saturating_add(t) > max_bytes {
                return Err(too_large(format!("{url} announces {t} more bytes")));
            }
        }
        let mut body = resp.into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        let broke = loop {
            match body.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => {
                    if have + got + k as u64 > max_bytes {
                        return Err(too_large(format!("{url} sent more")));
                    }
                    out.write_all(&buf[..k])
                        .map_err(|e| io_err(format!("writing {}", part.display()), e))?;
                    got += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e.to_string()),
            }
        };
        out.sync_all()
            .map_err(|e| io_err(format!("syncing {}", part.display()), e))?;
        match (broke, total) {
            (Some(e), _) => last = format!("broke off after {got} bytes: {e}"),
            (None, Some(t)) if got != t => last = format!("{got} of {t} bytes"),
            (None, _) => {
                slmd_core::fsutil::commit(part, &done)
                    .map_err(|e| io_err(format!("renaming {}", part.display()), e))?;
                return Ok(done);
            }
        }
    }
    if part.exists() && last.is_empty() {
        slmd_core::fsutil::commit(part, &done)
            .map_err(|e| io_err(format!("renaming {}", part.display()), e))?;
        return Ok(done);
    }
    Err(fail(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_sources_need_a_prefix_or_the_source_dir() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("b.slmdb"), b"x").unwrap();
        std::fs::write(dir.path().join("out.slmdb"), b"x").unwrap();
        let reason = |n: &Network, s: &str| n.check(s).err().map(|e| e.reason());
        let none = Network::default();
        assert_eq!(reason(&none, "https://h/x.slmdb"), Some("not_allowed"));
        let b = inside.join("b.slmdb");
        assert_eq!(reason(&none, b.to_str().unwrap()), Some("not_allowed"));
        let n = Network {
            url_prefixes: vec!["https://h/slmd/".into()],
            source_dir: Some(inside.clone()),
        };
        assert_eq!(reason(&n, "https://h/slmd/x.slmdb"), None);
        for bad in [
            "https://h/other/x.slmdb",
            "https://h/slmd/../admin",
            "https://h/slmd/x y",
            "https://user@h/slmd/x",
            "http://h/slmd/x",
        ] {
            assert_eq!(reason(&n, bad), Some("not_allowed"), "{bad}");
        }
        assert_eq!(reason(&n, b.to_str().unwrap()), None);
        assert_eq!(reason(&n, &format!("file://{}", b.display())), None);
        let escape = format!("{}/../out.slmdb", inside.display());
        assert_eq!(reason(&n, &escape), Some("not_allowed"));
        assert_eq!(reason(&n, "/nonexistent/x"), Some("not_a_bundle"));
    }
}
