//! Single instance per state directory: an exclusive `flock(2)` on
//! `<state>/slmd.lock`, held for the life of the process (the kernel drops it
//! when the process dies, however it dies). The file holds the owner's pid,
//! so the refusal can name it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another slmd (pid {pid}) is running with the state directory {}; one instance per \
         state directory (give each instance its own state.dir)",
        .dir.display()
    )]
    Held { dir: PathBuf, pid: String },
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while it lives.
pub struct StateLock {
    _flock: Flock<File>,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<StateLock, LockError> {
        let path = dir.join("slmd.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: pid.trim().to_owned(),
                });
            }
            Err((_, errno)) => return Err(io(errno.into())),
        };
        flock.set_len(0).map_err(io)?;
        flock.rewind().map_err(io)?;
        writeln!(flock, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { _flock: flock })
    }
}

/// The pid of the process holding `dir`'s lock, if one does.
pub fn holder(dir: &Path) -> Option<nix::unistd::Pid> {
    let path = dir.join("slmd.lock");
    let mut file = OpenOptions::new().read(true).open(path).ok()?;
    let mut pid = String::new();
    file.read_to_string(&mut pid).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err(_) => pid.trim().parse().ok().map(nix::unistd::Pid::from_raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts just as another process would.
        match StateLock::acquire(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {:?}", other.err()),
        }
        assert_eq!(
            holder(dir.path()).map(|p| p.as_raw() as u32),
            Some(std::process::id())
        );
        drop(first);
        assert_eq!(holder(dir.path()), None);
        StateLock::acquire(dir.path()).expect("free again");
    }
}
