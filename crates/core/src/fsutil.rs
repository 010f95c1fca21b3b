//! Durable file replacement: after a crash or power cut a reader finds the
//! old file or the new one, whole, never a mix or nothing.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary name a file is written under before it replaces `path`:
/// `path` with `.tmp` appended (`head.json` -> `head.json.tmp`).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it
/// over `path` and fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    commit(&tmp, path)
}

/// [`write_atomic`] under a temporary name of its own (process id and a
/// counter), for a file that other writers (another engine in this
/// process, another process) may be writing at the same moment: each
/// rename installs a whole file. Temporaries end in `.tmp`.
pub fn write_atomic_unique(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(name);
    let written = std::fs::write(&tmp, bytes).and_then(|()| commit(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Makes a file written elsewhere (a download, a derived model) the file at
/// `dest`: fsyncs it, renames it and fsyncs the directory.
pub fn commit(written: &Path, dest: &Path) -> io::Result<()> {
    File::open(written)?.sync_all()?;
    std::fs::rename(written, dest)?;
    sync_parent(dest)
}

/// Fsyncs the directory holding `path`, so a rename or removal in it
/// survives a power cut.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn concurrent_writers_each_install_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.kv");
        std::thread::scope(|s| {
            for b in [b'a', b'b', b'c', b'd'] {
                let path = &path;
                s.spawn(move || write_atomic_unique(path, &[b; 4096]).unwrap());
            }
        });
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() == 4096 && bytes.iter().all(|&x| x == bytes[0]));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporaries"
        );
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        // The temporary's name is taken by a directory: creating it fails.
        std::fs::create_dir(tmp_path(&path)).unwrap();
        assert!(write_atomic(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
