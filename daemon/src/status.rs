//! `slmd status`: what is waiting in the store, readable while the daemon
//! runs.
//!
//! sled lets one process open the store, so the running daemon keeps a
//! snapshot in `status.json` (write, then rename: a reader never sees half
//! a file). It is written only when something in it changes, not on a
//! timer, and it goes to the runtime directory when systemd gives one
//! (`RuntimeDirectory=slmd`: a tmpfs, `$RUNTIME_DIRECTORY`), else to the
//! state directory, so a quiet device does not wear its flash. `slmd
//! status` reads the store itself when no daemon holds it, and the
//! snapshot of the daemon that holds it when one does, with its ages
//! brought up to now.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use slmd_core::now_ms;
use slmd_link::Link;
use slmd_store::{Stats, Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The daemon's pid, when this is a running daemon's snapshot.
    pub pid: Option<u32>,
    /// When the figures were taken (wall-clock ms).
    pub taken_ms: u64,
    /// The state directory the figures are of.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Connected to the broker (unknown without a running daemon).
    pub connected: Option<bool>,
    /// Input held at the broker because the store is over its quota or
    /// cannot be written.
    pub quota_full: Option<bool>,
    #[serde(flatten)]
    pub store: Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store is in use but no daemon snapshot of it can be read ({tried}): {source}")]
    Snapshot {
        tried: String,
        source: std::io::Error,
    },
    #[error("{path} does not parse: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where a daemon on `state_dir` writes its snapshot.
pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| state_dir.to_owned())
        .join("status.json")
}

/// Where `slmd status` looks: the runtime directories a daemon may have
/// been given, then the state directory.
fn snapshot_candidates(state_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push("/run/slmd".into());
    dirs.push(state_dir.to_owned());
    dirs.into_iter().map(|d| d.join("status.json")).collect()
}

/// The store's figures: from the store when it is free, else from the
/// running daemon's snapshot.
pub fn read(state_dir: &Path) -> Result<Status, StatusError> {
    // A running daemon's snapshot first: opening sled also writes, which a
    // full disk refuses before the store's own lock is even tried.
    if slmd_store::lock::holder(state_dir).is_some() {
        return read_snapshot(state_dir);
    }
    match Store::open(state_dir) {
        Ok(store) => Ok(Status {
            pid: None,
            taken_ms: now_ms(),
            state_dir: Some(state_dir.to_owned()),
            connected: None,
            quota_full: None,
            store: store.stats()?,
        }),
        Err(StoreError::Locked { .. }) => read_snapshot(state_dir),
        Err(e) => Err(e.into()),
    }
}

fn read_snapshot(state_dir: &Path) -> Result<Status, StatusError> {
    let candidates = snapshot_candidates(state_dir);
    let mut last_error = None;
    for path in &candidates {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let status: Status =
            serde_json::from_slice(&text).map_err(|source| StatusError::Parse {
                path: path.clone(),
                source,
            })?;
        // Another instance's snapshot in a shared runtime directory.
        if status
            .state_dir
            .as_deref()
            .is_some_and(|d| !same_dir(d, state_dir))
        {
            continue;
        }
        return Ok(status.aged_to(now_ms()));
    }
    Err(StatusError::Snapshot {
        tried: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source: last_error
            .unwrap_or_else(|| std::io::Error::other("every snapshot is another instance's")),
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Status {
    /// One line for systemd's `STATUS=` (shown by `systemctl status`).
    pub fn line(&self) -> String {
        let link = match (self.connected, self.quota_full, &self.store.write_failure) {
            (_, _, Some(_)) => "the store cannot be written, holding input at the broker",
            (_, Some(true), _) => "store quota full, holding input at the broker",
            (Some(true), _, _) => "connected",
            _ => "broker unreachable, working offline",
        };
        format!(
            "{link}; inbox {}, outbox {}, dead letters {}",
            self.store.inbox, self.store.outbox, self.store.dead_letters
        )
    }

    /// The snapshot as it stands at `now`: nothing changed since it was
    /// taken (it is rewritten on every change), so what waited then has
    /// waited longer now.
    pub fn aged_to(mut self, now: u64) -> Status {
        let since = now.saturating_sub(self.taken_ms);
        for age in [
            &mut self.store.oldest_inbox_age_ms,
            &mut self.store.oldest_outbox_age_ms,
        ] {
            *age = age.map(|a| a + since);
        }
        self.taken_ms = now;
        self
    }

    /// What identifies a change: everything but the time it was taken,
    /// with ages as the instants they began.
    fn key(&self) -> Status {
        let since = |age: Option<u64>| age.map(|a| self.taken_ms.saturating_sub(a) / 1000);
        let mut k = self.clone();
        k.taken_ms = 0;
        k.store.oldest_inbox_age_ms = since(self.store.oldest_inbox_age_ms);
        k.store.oldest_outbox_age_ms = since(self.store.oldest_outbox_age_ms);
        k
    }
}

/// Looks every second and writes the snapshot when it changed, until
/// shutdown, and once more then.
pub async fn run_writer(
    state_dir: PathBuf,
    store: Store,
    link: Arc<Link>,
    notifier: crate::notify::Notifier,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = snapshot_path(&state_dir);
    let mut written: Option<Status> = None;
    let mut said = None;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = shutdown.changed() => true,
        };
        let (connected, holding) = link.state();
        let status = match store.stats() {
            Ok(stats) => Status {
                pid: Some(std::process::id()),
                taken_ms: now_ms(),
                state_dir: Some(state_dir.clone()),
                connected: Some(connected && !stopping),
                quota_full: Some(holding),
                store: stats,
            },
            Err(e) => {
                log::debug!("no status figures: {e}");
                continue;
            }
        };
        if written.as_ref().map(Status::key) != Some(status.key()) {
            if !stopping {
                notifier.status(&status.line());
            }
            let bytes = serde_json::to_vec_pretty(&status).expect("status serialises");
            let to = path.clone();
            let write =
                tokio::task::spawn_blocking(move || slmd_core::fsutil::write_atomic(&to, &bytes));
            match write
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            {
                Ok(()) => {
                    written = Some(status);
                    said = None;
                }
                Err(e) => {
                    let why = e.to_string();
                    if said.as_ref() != Some(&why) {
                        log::warn!("cannot write {}: {why}", path.display());
                        said = Some(why);
                    }
                }
            }
        }
        if stopping {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(taken_ms: u64, inbox_age: Option<u64>) -> Status {
        Status {
            pid: Some(1),
            taken_ms,
            state_dir: None,
            connected: Some(true),
            quota_full: Some(false),
            store: Stats {
                inbox: usize::from(inbox_age.is_some()),
                oldest_inbox_age_ms: inbox_age,
                ..Stats::default()
            },
        }
    }

    #[test]
    fn a_snapshot_changes_only_when_its_content_does_and_ages_on_reading() {
        // The same message waiting, seen a second later: no change.
        assert_eq!(
            status(10_000, Some(2_000)).key(),
            status(11_000, Some(3_000)).key()
        );
        // Another message in its place, or none: a change.
        assert_ne!(
            status(10_000, Some(2_000)).key(),
            status(11_000, Some(500)).key()
        );
        assert_ne!(
            status(10_000, Some(2_000)).key(),
            status(11_000, None).key()
        );
        assert_eq!(
            status(10_000, None).key(),
            status(99_000, None).key(),
            "a quiet daemon writes nothing"
        );
        let read = status(10_000, Some(2_000)).aged_to(15_000);
        assert_eq!(read.store.oldest_inbox_age_ms, Some(7_000));
        assert_eq!(read.taken_ms, 15_000);
    }
}
