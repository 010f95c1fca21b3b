//! Decoded prompts kept on disk, so a restart restores them instead of
//! decoding them again: llama.cpp copies one KV sequence out as bytes
//! (`llama_state_seq_get_data_ext`) and into another context's sequence
//! (`llama_state_seq_set_data_ext`).
//!
//! A file is named by hashes of what its cells depend on: the group (the
//! llama.cpp build, the model's identity and the context's cell layout),
//! then the prompt's tokens. A changed prompt, model or llama.cpp is
//! another name, so a stale file is never read. Nothing in llama.cpp's
//! format detects flipped bits, and its own file reader aborts the process
//! on a file cut short (seen here), so each file carries its group, its
//! tokens and a SHA-256 of its contents, checked before llama.cpp sees a
//! byte; a file that fails the check is removed and the prompt decoded.
//! Writes go to a temporary name of their own, then are fsynced and
//! renamed.
//!
//! Storage is bounded: after a start, files of its group other than the
//! current prompts are kept (a rollback or a reverted edit restores them)
//! only while the group takes at most twice what the current prompts take,
//! newest first; files of other groups (another model, say) go once unused
//! for [`STALE`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

/// The llama.cpp this engine links (the `llama-cpp-sys-2` crate pins one
/// llama.cpp commit per version); a unit test checks it against Cargo.lock.
pub const LLAMA_CPP: &str = "llama-cpp-sys-2 0.1.161";

const EXTENSION: &str = "kv";
/// A file: this, the group's salt (u64 length, bytes), the token count
/// (u64), the tokens (i32 each), the state's length (u64), the state, then
/// the SHA-256 of all that came before; all little-endian.
const MAGIC: &[u8; 8] = b"SLMDKV2\0";
/// Files of another group unused this long are removed by [`KvFiles::prune`].
pub const STALE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A directory of saved sequences for one model and context layout.
#[derive(Debug, Clone)]
pub struct KvFiles {
    dir: PathBuf,
    /// What every file's cells depend on besides its tokens.
    salt: String,
    /// What its files' names begin with: a hash of `salt`.
    group: String,
}

impl KvFiles {
    /// Files under `dir` for the model whose file has SHA-256
    /// `model_sha256`.
    pub fn new(dir: &Path, model_sha256: &str) -> KvFiles {
        KvFiles::salted(dir, format!("{LLAMA_CPP}\n{model_sha256}\n"))
    }

    fn salted(dir: &Path, salt: String) -> KvFiles {
        KvFiles {
            dir: dir.to_path_buf(),
            group: hex::encode(&Sha256::digest(salt.as_bytes())[..8]),
            salt,
        }
    }

    /// These files, for a context described by `layout` (its size, cell
    /// type, micro-batch and sequence sharing).
    pub fn with_layout(&self, layout: &str) -> KvFiles {
        KvFiles::salted(&self.dir, format!("{}{layout}\n", self.salt))
    }

    /// The file of the sequence holding `tokens`: `<group>-<tokens>.kv`.
    pub fn path(&self, tokens: &[LlamaToken]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        for t in tokens {
            h.update(t.0.to_le_bytes());
        }
        let hex = hex::encode(h.finalize());
        self.dir
            .join(format!("{}-{}.{EXTENSION}", self.group, &hex[..32]))
    }

    /// Loads `tokens`' saved sequence into `seq`; false when there is none
    /// or it cannot be used (the sequence is then empty, and a damaged file
    /// removed).
    pub fn restore(&self, ctx: &mut LlamaContext<'_>, seq: i32, tokens: &[LlamaToken]) -> bool {
        let path = self.path(tokens);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => return unusable(ctx, seq, &path, &e.to_string(), false),
        };
        let Some(state) = unwrap(&bytes, &self.salt, tokens) else {
            let why = "its checksum, group or tokens do not match";
            return unusable(ctx, seq, &path, why, true);
        };
        // SAFETY: the bytes are a state llama.cpp wrote for a context of this
        // build, model and layout holding these tokens (the header says so),
        // whole (its SHA-256 says so).
        let set = unsafe { ctx.state_seq_set_data_ext(state, seq, LlamaStateSeqFlags::empty()) };
        if !set {
            return unusable(ctx, seq, &path, "llama.cpp refused it", false);
        }
        true
    }

    /// Saves sequence `seq`, which holds `tokens`; a failure is logged
    /// and costs only time at the next start.
    pub fn save(&self, ctx: &LlamaContext<'_>, seq: i32, tokens: &[LlamaToken]) {
        let flags = LlamaStateSeqFlags::empty();
        let size = ctx.state_seq_get_size_ext(seq, flags);
        let path = self.path(tokens);
        let written = if size == 0 {
            Err(std::io::Error::other("llama.cpp has no state for it"))
        } else {
            let mut state = vec![0u8; size];
            // SAFETY: `state` has the size llama.cpp just gave for this
            // sequence, on this thread, with nothing decoded in between.
            let n = unsafe { ctx.state_seq_get_data_ext(state.as_mut_ptr(), seq, flags) };
            if n == size {
                std::fs::create_dir_all(&self.dir).and_then(|()| {
                    slmd_core::fsutil::write_atomic_unique(&path, &wrap(&self.salt, tokens, &state))
                })
            } else {
                Err(std::io::Error::other(format!(
                    "llama.cpp copied {n} of {size} bytes"
                )))
            }
        };
        if let Err(e) = written {
            log::warn!("cannot save the decoded prompt {}: {e}", path.display());
        }
    }

    /// Removes the oldest files of this group not in `current` while the
    /// group takes more than twice what `current`'s take, files of other
    /// groups unused for [`STALE`], and temporaries a crash left (an hour
    /// old); `current`'s files are marked as used now.
    pub fn prune(&self, current: &[Vec<LlamaToken>]) {
        let keep: Vec<PathBuf> = current.iter().map(|t| self.path(t)).collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let group = format!("{}-", self.group);
        let now = SystemTime::now();
        let mut ours: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut kept = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let age = now.duration_since(modified).unwrap_or_default();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.extension().is_some_and(|e| e == "tmp") {
                if age > Duration::from_secs(3600) {
                    let _ = std::fs::remove_file(&path);
                }
            } else if path.extension().is_none_or(|e| e != EXTENSION) {
                continue;
            } else if keep.contains(&path) {
                kept += meta.len();
                // Its age says it is in use (a request's restore stays off
                // the disk's metadata).
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(now));
            } else if name.starts_with(&group) {
                ours.push((modified, meta.len(), path));
            } else if age > STALE {
                let _ = std::fs::remove_file(&path);
            }
        }
        ours.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut total = kept;
        for (_, len, path) in ours {
            total += len;
            if total > 2 * kept {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Logs why `path` cannot be restored, empties `seq`, and removes the file
/// when it is `damaged` (not when llama.cpp had no room for it, say).
fn unusable(ctx: &mut LlamaContext<'_>, seq: i32, path: &Path, why: &str, damaged: bool) -> bool {
    log::warn!(
        "cannot restore the decoded prompt {} ({why}); decoding it again",
        path.display()
    );
    let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    if damaged {
        let _ = std::fs::remove_file(path);
    }
    false
}

/// A file's contents for a state of `tokens` in the group `salt` (see
/// [`MAGIC`]).
fn wrap(salt: &str, tokens: &[LlamaToken], state: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend((salt.len() as u64).to_le_bytes());
    out.extend(salt.as_bytes());
    out.extend((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        out.extend(t.0.to_le_bytes());
    }
    out.extend((state.len() as u64).to_le_bytes());
    out.extend(state);
    let sum = Sha256::digest(&out);
    out.extend(sum);
    out
}

/// The state in a file's `bytes`, if they are whole and hold `tokens` in
/// the group `salt`.
fn unwrap<'b>(bytes: &'b [u8], salt: &str, tokens: &[LlamaToken]) -> Option<&'b [u8]> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let (n, rest) = rest.split_first_chunk::<8>()?;
    let (saved_salt, rest) =
        rest.split_at_checked(usize::try_from(u64::from_le_bytes(*n)).ok()?)?;
    let (n, rest) = rest.split_first_chunk::<8>()?;
    let n = usize::try_from(u64::from_le_bytes(*n)).ok()?;
    let (saved, rest) = rest.split_at_checked(n.checked_mul(4)?)?;
    let same = saved_salt == salt.as_bytes()
        && n == tokens.len()
        && saved
            .chunks_exact(4)
            .zip(tokens)
            .all(|(b, t)| i32::from_le_bytes(b.try_into().expect("4")) == t.0);
    let (len, state) = rest.split_first_chunk::<8>()?;
    (same && u64::from_le_bytes(*len) == state.len() as u64).then_some(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gives_back_its_state_only_whole_and_for_its_tokens() {
        let tokens = [LlamaToken(7), LlamaToken(-1)];
        let state = b"cells";
        let file = wrap("g", &tokens, state);
        assert_eq!(unwrap(&file, "g", &tokens), Some(&state[..]));
        assert_eq!(unwrap(&file, "g", &tokens[..1]), None, "other tokens");
        assert_eq!(unwrap(&file, "h", &tokens), None, "another group");
        for cut in [0, 1, 8, file.len() / 2, file.len() - 1] {
            assert_eq!(unwrap(&file[..cut], "g", &tokens), None, "cut at {cut}");
        }
        let mut flipped = file.clone();
        flipped[30] ^= 1;
        assert_eq!(unwrap(&flipped, "g", &tokens), None, "a flipped bit");
        assert_eq!(
            unwrap(&wrap("g", &tokens, b""), "g", &tokens),
            Some(&b""[..])
        );
    }

    #[test]
    fn the_pinned_llama_cpp_is_the_one_cargo_builds() {
        let lock =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock"))
                .unwrap();
        let (name, version) = LLAMA_CPP.split_once(' ').unwrap();
        let entry = format!("name = \"{name}\"\nversion = \"{version}\"");
        assert!(lock.contains(&entry), "Cargo.lock has no {entry}");
    }

    #[test]
    fn a_file_is_named_by_the_model_the_layout_and_the_tokens() {
        let dir = Path::new("/kv");
        let t = |ids: &[i32]| ids.iter().map(|&i| LlamaToken(i)).collect::<Vec<_>>();
        let files = |sha, layout| KvFiles::new(dir, sha).with_layout(layout);
        let base = files("aa", "f16").path(&t(&[1, 2]));
        assert_eq!(base, files("aa", "f16").path(&t(&[1, 2])));
        assert_ne!(base, files("ab", "f16").path(&t(&[1, 2])));
        assert_ne!(base, files("aa", "q8").path(&t(&[1, 2])));
        assert_ne!(base, files("aa", "f16").path(&t(&[2, 1])));
        assert_eq!(base.extension().unwrap(), EXTENSION);
    }

    #[test]
    fn pruning_keeps_the_current_files_and_the_newest_others_up_to_as_much_again() {
        let dir = tempfile::tempdir().unwrap();
        let files = KvFiles::new(dir.path(), "aa").with_layout("f16");
        let other_model = KvFiles::new(dir.path(), "bb").with_layout("f16");
        let tokens = |i: i32| vec![LlamaToken(i)];
        let write = |path: PathBuf, age: Duration| {
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(SystemTime::now() - age).unwrap();
            path
        };
        let s = Duration::from_secs;
        write(files.path(&tokens(1)), s(1000));
        write(files.path(&tokens(2)), s(10));
        write(files.path(&tokens(3)), s(20));
        write(files.path(&tokens(4)), s(30));
        let recent = write(other_model.path(&tokens(1)), s(3600));
        let stale = write(other_model.path(&tokens(2)), STALE + s(1));
        let crashed = write(dir.path().join("x.123.0.tmp"), s(7200));
        let writing = write(dir.path().join("y.456.0.tmp"), s(1));
        std::fs::write(dir.path().join("other.json"), b"{}").unwrap();
        files.prune(&[tokens(1)]);
        let present = |i: i32| files.path(&tokens(i)).is_file();
        // Current (however old), then the newest other: 200 of 200 bytes.
        assert!(present(1) && present(2));
        assert!(!present(3) && !present(4));
        assert!(recent.exists(), "another model's, in use lately");
        assert!(!stale.exists(), "another model's, unused for a week");
        assert!(!crashed.exists() && writing.exists());
        assert!(dir.path().join("other.json").exists(), "not ours");
    }
}
