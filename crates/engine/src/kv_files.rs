//! Decoded prompts kept on disk, so a restart restores them instead of
//! decoding them again: llama.cpp copies one KV sequence out as bytes
//! (`llama_state_seq_get_data_ext`) and into another context's sequence
//! (`llama_state_seq_set_data_ext`).
//!
//! A file is named by a hash of everything its cells depend on: the
//! llama.cpp build, the model file's SHA-256, the context's cell layout and
//! the prompt's tokens. A changed prompt, model or llama.cpp is another name,
//! so a stale file is never read. llama.cpp trusts the bytes it is given (a
//! file cut short aborts the process in its reader), so each file carries
//! its tokens and a SHA-256 of its contents, checked before llama.cpp sees
//! a byte; a file that fails the check is removed and the prompt decoded.
//! Writes go to a temporary name, then are fsynced and renamed.
//!
//! Storage is bounded: after a start, files of other prompts are kept (a
//! rollback or a reverted edit restores them) only while all files together
//! take at most twice what the current prompts take, newest first.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

/// The llama.cpp this engine links (the `llama-cpp-sys-2` crate pins one
/// llama.cpp commit per version); a unit test checks it against Cargo.lock.
pub const LLAMA_CPP: &str = "llama-cpp-sys-2 0.1.161";

const EXTENSION: &str = "kv";
/// A file: this, the token count (u64), the tokens (i32 each), the state's
/// length (u64), the state, then the SHA-256 of all that came before; all
/// little-endian.
const MAGIC: &[u8; 8] = b"SLMDKV1\0";

/// A directory of saved sequences for one model and context layout.
#[derive(Debug, Clone)]
pub struct KvFiles {
    dir: PathBuf,
    /// What every file's cells depend on besides its tokens.
    salt: String,
}

impl KvFiles {
    /// Files under `dir` for the model whose file has SHA-256
    /// `model_sha256`.
    pub fn new(dir: &Path, model_sha256: &str) -> KvFiles {
        KvFiles {
            dir: dir.to_path_buf(),
            salt: format!("{LLAMA_CPP}\n{model_sha256}\n"),
        }
    }

    /// These files, for a context described by `layout` (its size, cell
    /// type, micro-batch and sequence sharing).
    pub fn with_layout(&self, layout: &str) -> KvFiles {
        KvFiles {
            dir: self.dir.clone(),
            salt: format!("{}{layout}\n", self.salt),
        }
    }

    /// The file of the sequence holding `tokens`.
    pub fn path(&self, tokens: &[LlamaToken]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        for t in tokens {
            h.update(t.0.to_le_bytes());
        }
        let hex = hex::encode(h.finalize());
        self.dir.join(format!("{}.{EXTENSION}", &hex[..32]))
    }

    /// Loads `tokens`' saved sequence into `seq` (which must be empty);
    /// false when there is none or it cannot be used (the sequence is
    /// left empty and an unusable file removed).
    pub fn restore(&self, ctx: &mut LlamaContext<'_>, seq: i32, tokens: &[LlamaToken]) -> bool {
        let path = self.path(tokens);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => return self.unusable(ctx, seq, &path, &e.to_string()),
        };
        let Some(state) = unwrap(&bytes, tokens) else {
            return self.unusable(ctx, seq, &path, "its checksum or tokens do not match");
        };
        // SAFETY: the bytes are a state llama.cpp wrote for a context of this
        // build, model and layout (the file's name says so) holding these
        // tokens, whole (the checksum says so).
        let set = unsafe { ctx.state_seq_set_data_ext(state, seq, LlamaStateSeqFlags::empty()) };
        if !set {
            return self.unusable(ctx, seq, &path, "llama.cpp refused it");
        }
        // Its age says it is in use (see `prune`).
        let _ = std::fs::File::options()
            .append(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        true
    }

    fn unusable(&self, ctx: &mut LlamaContext<'_>, seq: i32, path: &Path, why: &str) -> bool {
        log::warn!(
            "cannot restore the decoded prompt {} ({why}); decoding it again",
            path.display()
        );
        let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        let _ = std::fs::remove_file(path);
        false
    }

    /// Saves sequence `seq`, which holds `tokens`; a failure is logged
    /// and costs only time at the next start.
    pub fn save(&self, ctx: &LlamaContext<'_>, seq: i32, tokens: &[LlamaToken]) {
        let flags = LlamaStateSeqFlags::empty();
        let mut state = vec![0u8; ctx.state_seq_get_size_ext(seq, flags)];
        // SAFETY: `state` has the size llama.cpp just gave for this sequence.
        let n = unsafe { ctx.state_seq_get_data_ext(state.as_mut_ptr(), seq, flags) };
        let path = self.path(tokens);
        let written = if n == state.len() {
            std::fs::create_dir_all(&self.dir)
                .and_then(|()| slmd_core::fsutil::write_atomic(&path, &wrap(tokens, &state)))
        } else {
            Err(std::io::Error::other(format!(
                "llama.cpp copied {n} of {} bytes",
                state.len()
            )))
        };
        if let Err(e) = written {
            log::warn!("cannot save the decoded prompt {}: {e}", path.display());
        }
    }

    /// Removes the oldest files of prompts not in `current` while all files
    /// take more than twice what `current`'s take, and any temporary a
    /// crash left.
    pub fn prune(&self, current: &[Vec<LlamaToken>]) {
        let keep: Vec<PathBuf> = current.iter().map(|t| self.path(t)).collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut kept = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
            } else if keep.contains(&path) {
                kept += meta.len();
            } else if path.extension().is_some_and(|e| e == EXTENSION) {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((modified, meta.len(), path));
            }
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut total = kept;
        for (_, len, path) in files {
            total += len;
            if total > 2 * kept {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// A file's contents for a state of `tokens` (see [`MAGIC`]).
fn wrap(tokens: &[LlamaToken], state: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
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

/// The state in a file's `bytes`, if they are whole and hold `tokens`.
fn unwrap<'b>(bytes: &'b [u8], tokens: &[LlamaToken]) -> Option<&'b [u8]> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let (n, rest) = rest.split_first_chunk::<8>()?;
    let n = usize::try_from(u64::from_le_bytes(*n)).ok()?;
    let (saved, rest) = rest.split_at_checked(n.checked_mul(4)?)?;
    let same = n == tokens.len()
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
        let file = wrap(&tokens, state);
        assert_eq!(unwrap(&file, &tokens), Some(&state[..]));
        assert_eq!(unwrap(&file, &tokens[..1]), None, "other tokens");
        for cut in [0, 1, 8, file.len() / 2, file.len() - 1] {
            assert_eq!(unwrap(&file[..cut], &tokens), None, "cut at {cut}");
        }
        let mut flipped = file.clone();
        flipped[30] ^= 1;
        assert_eq!(unwrap(&flipped, &tokens), None, "a flipped bit");
        assert_eq!(unwrap(&wrap(&tokens, b""), &tokens), Some(&b""[..]));
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
        let tokens = |i: i32| vec![LlamaToken(i)];
        let write = |i: i32, age_s: u64| {
            let path = files.path(&tokens(i));
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(SystemTime::now() - std::time::Duration::from_secs(age_s))
                .unwrap();
        };
        write(1, 1000);
        write(2, 10);
        write(3, 20);
        write(4, 30);
        std::fs::write(dir.path().join("x.kv.tmp"), b"part").unwrap();
        std::fs::write(dir.path().join("other.json"), b"{}").unwrap();
        files.prune(&[tokens(1)]);
        let present = |i: i32| files.path(&tokens(i)).is_file();
        // Current (however old), then the newest other: 200 of 200 bytes.
        assert!(present(1) && present(2));
        assert!(!present(3) && !present(4));
        assert!(!dir.path().join("x.kv.tmp").exists());
        assert!(dir.path().join("other.json").exists(), "not ours");
    }
}
