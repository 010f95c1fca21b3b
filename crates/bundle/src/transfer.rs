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
//!
//! Chunks are unsigned and anyone on the broker may announce (when signed
//! requests are not required), so a transfer is bounded before anything is
//! written ([`Bounds`]): its declared size against `max_bundle_bytes` and
//! against free space (minus the reserve and what open transfers still
//! need), the number open at once, and a transfer with no chunk for
//! `transfer_expiry_secs` is deleted. The state file stays small: a
//! transfer has at most [`MAX_CHUNKS`] chunks, recorded as a bitmap.
//! A chunk that comes after its transfer completed, or again, is ignored
//! without an answer.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{io_err, BundleError};

/// Chunk size bounds: a chunk in base64 and its JSON must fit the daemon's
/// 1 MiB MQTT packet limit.
const MIN_CHUNK: u64 = 1 << 10;
const MAX_CHUNK: u64 = 512 << 10;
/// Missing chunk indices listed in one progress report.
const LIST_MISSING: usize = 64;
/// Chunks one transfer may have (a 2 KiB bitmap); with 512 KiB chunks
/// that is 8 GiB.
pub const MAX_CHUNKS: u64 = 16384;
/// Finished transfers remembered so that their late chunks are ignored.
const REMEMBER_FINISHED: usize = 32;

/// What transfers may take (from `[updates]`).
#[derive(Debug, Clone)]
pub struct Bounds {
    pub max_size: u64,
    pub max_transfers: usize,
    pub expiry: std::time::Duration,
    /// Free bytes that must remain on the file system.
    pub reserve: u64,
}

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
    /// Bit i of byte i / 8 is set once chunk i is in (base64).
    received: String,
}

/// The received-chunk bitmap, decoded.
struct Bits {
    bytes: Vec<u8>,
    chunks: u64,
}

impl Bits {
    fn new(chunks: u64) -> Bits {
        Bits {
            bytes: vec![0; chunks.div_ceil(8) as usize],
            chunks,
        }
    }
    fn of(st: &State) -> Bits {
        let chunks = st.start.size.div_ceil(st.start.chunk_size);
        let mut b = Bits::new(chunks);
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&st.received) {
            if bytes.len() == b.bytes.len() {
                b.bytes = bytes;
            }
        }
        b
    }
    fn get(&self, i: u64) -> bool {
        self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    fn set(&mut self, i: u64) {
        self.bytes[(i / 8) as usize] |= 1 << (i % 8);
    }
    fn count(&self) -> u64 {
        self.bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }
    fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }
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
    /// A chunk already in, or of a transfer that finished: nothing to say.
    Ignored,
}

/// Chunks are handled one at a time (the router runs messages
/// concurrently; a transfer's state is read, changed and written back).
pub struct Transfers {
    dir: PathBuf,
    bounds: Bounds,
    /// Held while a transfer's state changes; holds the ids of recently
    /// finished transfers.
    busy: std::sync::Mutex<VecDeque<String>>,
}

fn bad(m: impl Into<String>) -> BundleError {
    BundleError::NotBundle(format!("transfer: {}", m.into()))
}

impl Transfers {
    pub fn open(state_dir: &Path, bounds: Bounds) -> Result<Transfers, BundleError> {
        let dir = state_dir.join("bundles/.transfers");
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        let t = Transfers {
            dir,
            bounds,
            busy: Default::default(),
        };
        t.expire();
        Ok(t)
    }

    /// Ids of the open transfers.
    fn open_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_owned)
            })
            .collect()
    }

    /// Deletes transfers that have had no chunk for the expiry time, and
    /// files that belong to no transfer.
    fn expire(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > self.bounds.expiry);
            let orphan = name
                .strip_suffix(".slmdb")
                .is_some_and(|id| !self.dir.join(format!("{id}.json")).exists());
            if let Some(id) = name.strip_suffix(".json") {
                if stale {
                    log::info!(
                        "model transfer {id}: no chunk for {} s, deleted",
                        self.bounds.expiry.as_secs()
                    );
                    let _ = std::fs::remove_file(self.dir.join(format!("{id}.slmdb")));
                    let _ = std::fs::remove_file(&path);
                }
            } else if orphan || name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Bytes the open transfers (but `except`) still have to write.
    fn still_needed(&self, except: &str) -> Result<u64, BundleError> {
        let mut n = 0u64;
        for id in self.open_ids() {
            if id == except {
                continue;
            }
            let (file, state) = self.paths(&id)?;
            let Some(st) = self.load(&state)? else {
                continue;
            };
            let allocated = std::fs::metadata(&file).map_or(0, |m| m.blocks() * 512);
            n = n.saturating_add(st.start.size.saturating_sub(allocated));
        }
        Ok(n)
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
        let bytes = serde_json::to_vec(s).expect("state serializes");
        slmd_core::fsutil::write_atomic(path, &bytes)
            .map_err(|e| io_err("writing transfer state", e))
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
        let mut finished = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (file, state) = self.paths(&s.id)?;
        let max = self.bounds.max_size;
        if s.size == 0 {
            return Err(bad("size must be at least 1 byte"));
        }
        if s.size > max {
            return Err(BundleError::TooLarge {
                limit: max,
                what: format!("transfer {} declares {} bytes", s.id, s.size),
            });
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&s.chunk_size) {
            return Err(bad(format!(
                "chunk_size must be {MIN_CHUNK} to {MAX_CHUNK}"
            )));
        }
        if s.size.div_ceil(s.chunk_size) > MAX_CHUNKS {
            return Err(bad(format!(
                "at most {MAX_CHUNKS} chunks: chunk_size must be at least {}",
                s.size.div_ceil(MAX_CHUNKS)
            )));
        }
        if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256 must be 64 hex digits"));
        }
        if let Some(old) = self.load(&state)? {
            if old.start == s {
                return Ok(progress(&old, &file));
            }
        }
        self.expire();
        let open = self.open_ids().into_iter().filter(|i| *i != s.id).count();
        if open >= self.bounds.max_transfers {
            return Err(BundleError::NotAllowed(format!(
                "{open} transfer(s) are open, the most [updates] max_transfers allows"
            )));
        }
        let free = super::store::free_bytes(&self.dir)?;
        let needed = s
            .size
            .saturating_add(self.still_needed(&s.id)?)
            .saturating_add(self.bounds.reserve);
        if free < needed {
            return Err(BundleError::DiskFull {
                needed,
                free,
                dir: self.dir.clone(),
            });
        }
        finished.retain(|f| *f != s.id);
        let f =
            File::create(&file).map_err(|e| io_err(format!("creating {}", file.display()), e))?;
        f.set_len(s.size)
            .map_err(|e| io_err(format!("sizing {}", file.display()), e))?;
        let bits = Bits::new(s.size.div_ceil(s.chunk_size));
        let st = State {
            start: s,
            received: bits.encode(),
        };
        self.save(&state, &st)?;
        Ok(progress(&st, &file))
    }

    /// Writes one chunk (after checking its index, length and sha256).
    pub fn chunk(&self, c: Chunk) -> Result<Progress, BundleError> {
        let finished = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (file, state) = self.paths(&c.transfer)?;
        let Some(mut st) = self.load(&state)? else {
            if finished.contains(&c.transfer) {
                return Ok(Progress::Ignored);
            }
            return Err(bad(format!("no transfer {:?} was announced", c.transfer)));
        };
        let mut bits = Bits::of(&st);
        let s = &st.start;
        let chunks = bits.chunks;
        if c.index >= chunks {
            return Err(bad(format!("chunk {} of {chunks}", c.index)));
        }
        if bits.get(c.index) {
            return Ok(Progress::Ignored);
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
        bits.set(c.index);
        st.received = bits.encode();
        self.save(&state, &st)?;
        if bits.count() == chunks {
            let whole = slmd_engine::models::sha256_file(&file)
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
        Ok(progress(&st, &file))
    }

    /// Whether `s` is the announcement of a transfer open now (announcing
    /// it again resumes it).
    pub fn is_open(&self, s: &Start) -> bool {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let Ok((_, state)) = self.paths(&s.id) else {
            return false;
        };
        matches!(self.load(&state), Ok(Some(old)) if old.start == *s)
    }

    /// Removes a finished (installed or refused) transfer; its late chunks
    /// are ignored.
    pub fn finish(&self, id: &str) {
        let mut finished = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok((file, state)) = self.paths(id) {
            let _ = std::fs::remove_file(file);
            let _ = std::fs::remove_file(state);
            finished.retain(|f| f != id);
            finished.push_back(id.to_owned());
            if finished.len() > REMEMBER_FINISHED {
                finished.pop_front();
            }
        }
    }
}

/// A complete transfer announced again (its install may not have been
/// queued) is complete; the file was hashed when its last chunk came.
fn progress(st: &State, file: &Path) -> Progress {
    let bits = Bits::of(st);
    if bits.count() == bits.chunks {
        return Progress::Complete {
            path: file.to_path_buf(),
            activate: st.start.activate,
            force: st.start.force,
        };
    }
    let missing: Vec<u64> = (0..bits.chunks)
        .filter(|i| !bits.get(*i))
        .take(LIST_MISSING)
        .collect();
    Progress::Receiving {
        id: st.start.id.clone(),
        received: bits.count(),
        chunks: bits.chunks,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            max_size: 64 << 20,
            max_transfers: 2,
            expiry: std::time::Duration::from_secs(3600),
            reserve: 0,
        }
    }

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
        let t = Transfers::open(dir.path(), bounds()).unwrap();
        t.start(start.clone()).unwrap();
        for i in [9, 0, 3] {
            assert!(matches!(
                t.chunk(chunk("t-1", &data, i, 1024)).unwrap(),
                Progress::Receiving { .. }
            ));
        }
        // A chunk already in gets no answer.
        assert_eq!(
            t.chunk(chunk("t-1", &data, 3, 1024)).unwrap(),
            Progress::Ignored
        );
        // A corrupt chunk is refused and not counted.
        let mut wrong = chunk("t-1", &data, 4, 1024);
        wrong.sha256 = "0".repeat(64);
        assert!(t.chunk(wrong).is_err());
        // A restart: the same announcement reports what is missing.
        let t = Transfers::open(dir.path(), bounds()).unwrap();
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
        let t = Transfers::open(dir.path(), bounds()).unwrap();
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

    fn start(id: &str, size: u64, chunk_size: u64) -> Start {
        Start {
            id: id.into(),
            size,
            sha256: "ab".repeat(32),
            chunk_size,
            activate: false,
            force: false,
        }
    }

    #[test]
    fn announcements_are_bounded_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let t = Transfers::open(dir.path(), bounds()).unwrap();
        let files = || {
            std::fs::read_dir(dir.path().join("bundles/.transfers"))
                .unwrap()
                .count()
        };
        let e = t.start(start("huge", 8 << 30, 1024)).unwrap_err();
        assert_eq!(e.reason(), "too_large");
        // Over 16384 chunks.
        let e = t.start(start("many", 20 << 20, 1024)).unwrap_err();
        assert_eq!(e.reason(), "not_a_bundle");
        assert_eq!(files(), 0);
        // No room beside the reserve.
        let greedy = Bounds {
            reserve: u64::MAX / 2,
            ..bounds()
        };
        let full = Transfers::open(dir.path(), greedy).unwrap();
        assert_eq!(
            full.start(start("a", 4096, 1024)).unwrap_err().reason(),
            "disk_full"
        );
        assert_eq!(files(), 0);
        // Two at once; the state of a 1 MiB transfer of 1 KiB chunks is small.
        t.start(start("a", 1 << 20, 1024)).unwrap();
        t.start(start("b", 4096, 1024)).unwrap();
        let e = t.start(start("c", 4096, 1024)).unwrap_err();
        assert_eq!(e.reason(), "not_allowed");
        let state = dir.path().join("bundles/.transfers/a.json");
        assert!(std::fs::metadata(&state).unwrap().len() < 600);
        // Announcing an open one again is a resume, not a new transfer.
        assert!(t.is_open(&start("a", 1 << 20, 1024)));
        assert!(t.start(start("a", 1 << 20, 1024)).is_ok());
        // Finished: its chunks are ignored, and a new one may start.
        t.finish("b");
        let late = chunk("b", &[0u8; 4096], 0, 1024);
        assert_eq!(t.chunk(late).unwrap(), Progress::Ignored);
        t.start(start("c", 4096, 1024)).unwrap();
    }

    #[test]
    fn idle_transfers_expire() {
        let dir = tempfile::tempdir().unwrap();
        let quick = Bounds {
            expiry: std::time::Duration::from_millis(200),
            max_transfers: 1,
            ..bounds()
        };
        let t = Transfers::open(dir.path(), quick).unwrap();
        t.start(start("old", 4096, 1024)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        t.start(start("new", 4096, 1024)).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("bundles/.transfers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["new.json", "new.slmdb"]);
    }
}
