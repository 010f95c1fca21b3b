//! `slmd status`: what is waiting in the store, readable while the daemon
//! runs.
//!
//! sled lets one process open the store, so the running daemon writes a
//! snapshot to `<state>/status.json` every second (write, then rename: a
//! reader never sees half a file). `slmd status` reads the store itself when
//! no daemon holds it, and the snapshot when one does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::mqtt::Link;
use crate::store::{now_ms, Stats, Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The daemon's pid, when this is a running daemon's snapshot.
    pub pid: Option<u32>,
    /// When the figures were taken (wall-clock ms).
    pub taken_ms: u64,
    /// Connected to the broker (unknown without a running daemon).
    pub connected: Option<bool>,
    /// Input held at the broker because the store is over its quota.
    pub quota_full: Option<bool>,
    #[serde(flatten)]
    pub store: Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store is in use but {path} cannot be read: {source}")]
    Snapshot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not parse: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// The store's figures: from the store when it is free, else from the
/// running daemon's snapshot.
pub fn read(state_dir: &Path) -> Result<Status, StatusError> {
    match Store::open(state_dir) {
        Ok(store) => Ok(Status {
            pid: None,
            taken_ms: now_ms(),
            connected: None,
            quota_full: None,
            store: store.stats()?,
        }),
        Err(StoreError::Locked { .. }) => {
            let path = snapshot_path(state_dir);
            let text = std::fs::read(&path).map_err(|source| StatusError::Snapshot {
                path: path.clone(),
                source,
            })?;
            serde_json::from_slice(&text).map_err(|source| StatusError::Parse { path, source })
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the snapshot every second until shutdown, and once more then.
impl Status {
    /// One line for systemd's `STATUS=` (shown by `systemctl status`).
    pub fn line(&self) -> String {
        let link = match (self.connected, self.quota_full) {
            (_, Some(true)) => "store quota full, holding input at the broker",
            (Some(true), _) => "connected",
            _ => "broker unreachable, working offline",
        };
        format!(
            "{link}; inbox {}, outbox {}, dead letters {}",
            self.store.inbox, self.store.outbox, self.store.dead_letters
        )
    }
}

pub async fn run_writer(
    state_dir: PathBuf,
    store: Store,
    link: Arc<Link>,
    notifier: crate::notify::Notifier,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = snapshot_path(&state_dir);
    let tmp = state_dir.join("status.json.tmp");
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = shutdown.changed() => true,
        };
        let (connected, holding) = link.state();
        let status = store.stats().map(|stats| Status {
            pid: Some(std::process::id()),
            taken_ms: now_ms(),
            connected: Some(connected && !stopping),
            quota_full: Some(holding),
            store: stats,
        });
        let written = match status {
            Ok(s) => {
                if !stopping {
                    notifier.status(&s.line());
                }
                let bytes = serde_json::to_vec_pretty(&s).expect("status serialises");
                let write = async {
                    tokio::fs::write(&tmp, bytes).await?;
                    tokio::fs::rename(&tmp, &path).await
                };
                write.await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            log::warn!("cannot write {}: {e}", path.display());
        }
        if stopping {
            break;
        }
    }
}
