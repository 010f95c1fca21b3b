//! Where a bundle comes from: a local file, or an http(s) URL downloaded
//! into the store's staging area. A download that breaks off resumes where
//! it stopped (an HTTP range request) on the next attempt, also after a
//! restart: the partial file is kept under `.staging/<hash of URL>.part`.

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

/// Resolves `source` (a path, `file://PATH` or an http(s) URL).
pub fn fetch(source: &str, staging: &Path) -> Result<Fetched, BundleError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let path = download(source, staging)?;
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

fn download(url: &str, staging: &Path) -> Result<PathBuf, BundleError> {
    let name = hex::encode(&sha2::Sha256::digest(url.as_bytes())[..8]);
    let part = staging.join(format!("{name}.part"));
    let done = staging.join(format!("{name}.slmdb"));
    let agent = crate::models::new_agent();
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
            .open(&part)
            .map_err(|e| io_err(format!("opening {}", part.display()), e))?;
        let have = out
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
            Err(ureq::Error::Status(code, _)) if (400..500).contains(&code) => {
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
        }
        let total: Option<u64> = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse().ok());
        let mut body = resp.into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        let broke = loop {
            match body.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => {
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
                std::fs::rename(&part, &done)
                    .map_err(|e| io_err(format!("renaming {}", part.display()), e))?;
                return Ok(done);
            }
        }
    }
    if part.exists() && last.is_empty() {
        std::fs::rename(&part, &done)
            .map_err(|e| io_err(format!("renaming {}", part.display()), e))?;
        return Ok(done);
    }
    Err(fail(last))
}
