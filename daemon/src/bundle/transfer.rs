//! Bundles sent over MQTT in chunks, for devices whose only link is the
//! broker. A transfer is announced (id, size, sha256 of the whole file,
//! chunk size), then each chunk arrives with its index and its own sha256.
//! Chunks may come in any order and more than once; each is written at its
//! offset and recorded in a state file, so a transfer survives reconnects
//! and restarts: announcing it again answers with the chunks still missing,
//! and the sender sends those. When every chunk is in, the whole file must
//! hash to the announced sha256; then it is installed like any bundle file.
//!
//! ```text
//! <state>/bundles/.transfers/<id>.slmdb   the file being assembled
//! <state>/bundles/.transfers/<id>.json    announced figures, chunks received
//! ```

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{io_err, BundleError};

/// Largest bundle accepted over MQTT, and the chunk size bounds: a chunk
/// in base64 and its JSON must fit the daemon's 1 MiB MQTT packet limit.
const MAX_SIZE: u64 = 8 << 30;
const MIN_CHUNK: u64 = 1 << 10;
const MAX_CHUNK: u64 = 512 << 10;
/// Missing chunk indices listed in one progress report.
const LIST_MISSING: usize = 64;

/// `{"transfer": {...}}`: announces (or resumes) a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub id: String,
    pub size: u64,
    pub sha256: String,
    pub chunk_size: u64,
    #[serde(default = "yes")]
    pub activate: bool,
    #[serde(default)]
    pub force: bool,
}

fn yes() -> bool {
    true
}

/// `{"chunk": {...}}`: one piece, base64.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub transfer: String,
    pub index: u64,
    pub sha256: String,
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    start: Start,
    received: Vec<bool>,
}

/// Where a transfer stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Receiving {
        id: String,
        received: u64,
        chunks: u64,
        /// The first missing indices (up to 64).
        missing: Vec<u64>,
    },
    /// Every chunk is in and the file hashes right.
    Complete {
        path: PathBuf,
        activate: bool,
        force: bool,
    },
}

/// Chunks are handled one at a time (the router runs messages
/// concurrently; a transfer's state is read, changed and written back).
pub struct Transfers {
    dir: PathBuf,
    busy: std::sync::Mutex<()>,
}

fn bad(m: impl Into<String>) -> BundleError {
    BundleError::NotBundle(format!("transfer: {}", m.into()))
}

impl Transfers {
    pub fn open(state_dir: &Path) -> Result<Transfers, BundleError> {
        let dir = state_dir.join("bundles/.transfers");
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        Ok(Transfers {
            dir,
            busy: std::sync::Mutex::new(()),
        })
    }

    fn paths(&self, id: &str) -> Result<(PathBuf, PathBuf), BundleError> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad("id must be 1 to 64 of A-Z a-z 0-9 - _"));
        }
        Ok((
            self.dir.join(format!("{id}.slmdb")),
            self.dir.join(format!("{id}.json")),
        ))
    }

    fn save(&self, path: &Path, s: &State) -> Result<(), BundleError> {
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(|e| io_err("writing transfer state", e))?;
        f.write_all(&serde_json::to_vec(s).expect("state serializes"))
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err("writing transfer state", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("writing transfer state", e))
    }

    fn load(&self, path: &Path) -> Result<Option<State>, BundleError> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading transfer state", e)),
        }
    }

    /// Announces a transfer; the same announcement again resumes it.
    pub fn start(&self, s: Start) -> Result<Progress, BundleError> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (file, state) = self.paths(&s.id)?;
        if s.size == 0 || s.size > MAX_SIZE {
            return Err(bad(format!("size must be 1 to {MAX_SIZE} bytes")));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&s.chunk_size) {
            return Err(bad(format!(
                "chunk_size must be {MIN_CHUNK} to {MAX_CHUNK}"
            )));
        }
        if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256 must be 64 hex digits"));
        }
        if let Some(old) = self.load(&state)? {
            if old.start == s {
                return Ok(progress(&old));
            }
        }
        let f =
            File::create(&file).map_err(|e| io_err(format!("creating {}", file.display()), e))?;
        f.set_len(s.size)
            .map_err(|e| io_err(format!("sizing {}", file.display()), e))?;
        let chunks = s.size.div_ceil(s.chunk_size) as usize;
        let st = State {
            start: s,
            received: vec![false; chunks],
        };
        self.save(&state, &st)?;
        Ok(progress(&st))
    }

    /// Writes one chunk (after checking its index, length and sha256).
    pub fn chunk(&self, c: Chunk) -> Result<Progress, BundleError> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (file, state) = self.paths(&c.transfer)?;
        let mut st = self
            .load(&state)?
            .ok_or_else(|| bad(format!("no transfer {:?} was announced", c.transfer)))?;
        let s = &st.start;
        let chunks = st.received.len() as u64;
        if c.index >= chunks {
            return Err(bad(format!("chunk {} of {chunks}", c.index)));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(c.data.as_bytes())
            .map_err(|e| bad(format!("chunk {}: {e}", c.index)))?;
        let offset = c.index * s.chunk_size;
        let expected = s.chunk_size.min(s.size - offset);
        if data.len() as u64 != expected {
            return Err(bad(format!(
                "chunk {} is {} bytes, expected {expected}",
                c.index,
                data.len()
            )));
        }
        let sha = hex::encode(Sha256::digest(&data));
        if !sha.eq_ignore_ascii_case(&c.sha256) {
            return Err(bad(format!(
                "chunk {} sha256 is {sha}, not {}",
                c.index, c.sha256
            )));
        }
        let f = File::options()
            .write(true)
            .open(&file)
            .map_err(|e| io_err(format!("opening {}", file.display()), e))?;
        f.write_all_at(&data, offset)
            .and_then(|()| f.sync_data())
            .map_err(|e| io_err(format!("writing {}", file.display()), e))?;
        st.received[c.index as usize] = true;
        self.save(&state, &st)?;
        if st.received.iter().all(|r| *r) {
            let whole = crate::models::sha256_file(&file)
                .map_err(|e| io_err(format!("hashing {}", file.display()), e))?;
            if !whole.eq_ignore_ascii_case(&st.start.sha256) {
                let _ = std::fs::remove_file(&file);
                let _ = std::fs::remove_file(&state);
                return Err(BundleError::ShaMismatch {
                    expected: st.start.sha256,
                    actual: whole,
                });
            }
            return Ok(Progress::Complete {
                path: file,
                activate: st.start.activate,
                force: st.start.force,
            });
        }
        Ok(progress(&st))
    }

    /// Removes a finished (installed or refused) transfer.
    pub fn finish(&self, id: &str) {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok((file, state)) = self.paths(id) {
            let _ = std::fs::remove_file(file);
            let _ = std::fs::remove_file(state);
        }
    }
}

fn progress(st: &State) -> Progress {
    let missing: Vec<u64> = st
        .received
        .iter()
        .enumerate()
        .filter(|(_, r)| !**r)
        .map(|(i, _)| i as u64)
        .take(LIST_MISSING)
        .collect();
    Progress::Receiving {
        id: st.start.id.clone(),
        received: st.received.iter().filter(|r| **r).count() as u64,
        chunks: st.received.len() as u64,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, data: &[u8], index: u64, size: usize) -> Chunk {
        let part = &data[index as usize * size..((index as usize + 1) * size).min(data.len())];
        Chunk {
            transfer: id.into(),
            index,
            sha256: hex::encode(Sha256::digest(part)),
            data: base64::engine::general_purpose::STANDARD.encode(part),
        }
    }

    #[test]
    fn chunks_in_any_order_resume_after_reopen_and_assemble_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let start = Start {
            id: "t-1".into(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
            chunk_size: 1024,
            activate: true,
            force: false,
        };
        let t = Transfers::open(dir.path()).unwrap();
        t.start(start.clone()).unwrap();
        for i in [9, 0, 3, 3] {
            assert!(matches!(
                t.chunk(chunk("t-1", &data, i, 1024)).unwrap(),
                Progress::Receiving { .. }
            ));
        }
        // A corrupt chunk is refused and not counted.
        let mut wrong = chunk("t-1", &data, 4, 1024);
        wrong.sha256 = "0".repeat(64);
        assert!(t.chunk(wrong).is_err());
        // A restart: the same announcement reports what is missing.
        let t = Transfers::open(dir.path()).unwrap();
        let Progress::Receiving {
            received,
            chunks,
            missing,
            ..
        } = t.start(start).unwrap()
        else {
            panic!("not complete yet")
        };
        assert_eq!((received, chunks), (3, 10));
        assert_eq!(missing, vec![1, 2, 4, 5, 6, 7, 8]);
        let mut last = None;
        for i in missing {
            last = Some(t.chunk(chunk("t-1", &data, i, 1024)).unwrap());
        }
        let Some(Progress::Complete { path, .. }) = last else {
            panic!("{last:?}")
        };
        assert_eq!(std::fs::read(path).unwrap(), data);
    }

    #[test]
    fn a_file_that_does_not_hash_to_the_announced_sha256_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![1u8; 2048];
        let t = Transfers::open(dir.path()).unwrap();
        t.start(Start {
            id: "t".into(),
            size: 2048,
            sha256: "ab".repeat(32),
            chunk_size: 1024,
            activate: false,
            force: false,
        })
        .unwrap();
        t.chunk(chunk("t", &data, 0, 1024)).unwrap();
        let e = t.chunk(chunk("t", &data, 1, 1024)).unwrap_err();
        assert_eq!(e.reason(), "sha256_mismatch");
        assert!(t.chunk(chunk("t", &data, 0, 1024)).is_err(), "forgotten");
        assert!(t.paths("../x").is_err());
    }
}
