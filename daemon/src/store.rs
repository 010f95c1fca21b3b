//! The durable store: an inbox of received messages and an outbox of results
//! waiting for the broker, in one sled database under `<state>/store`.
//!
//! # Invariants
//!
//! - A message is acknowledged to the broker only after its inbox entry is
//!   flushed to disk ([`Store::flush`]). Until then the broker still owns it.
//! - Inbox keys are sled's monotonic ids (big-endian `u64`), so key order is
//!   receive order, across restarts.
//! - A processed message leaves the inbox and enters the outbox in one sled
//!   transaction ([`Store::complete`]), under the same key: it is either
//!   unprocessed or processed-with-its-result, never both, never neither.
//! - An outbox entry is removed only when the broker acknowledged its publish.
//! - The `(task, id)` of a processed message is recorded in `seen` in the same
//!   transaction, so a redelivery of it (same id) is recognised and not
//!   processed twice, for as long as the entry is kept (the dedup window).
//!
//! # Key layout
//!
//! | tree     | key            | value                                     |
//! |----------|----------------|-------------------------------------------|
//! | `inbox`  | id (u64 BE)    | [`InboxEntry`]: received ms, topic, payload |
//! | `outbox` | same id        | [`OutboxEntry`]: topic, payload           |
//! | `seen`   | task, 0, msg id | ms when processed (u64 BE)               |
//!
//! # What a crash leaves behind
//!
//! - Before the inbox flush: nothing of the message; it was not acknowledged,
//!   so the broker redelivers it (persistent session).
//! - After the flush, before the ack: the entry, and a redelivery of the same
//!   message; the consumer sees its result twice, with the same `id`.
//! - During processing: the inbox entry; it is processed again on start.
//! - After `complete`, before the publish is acknowledged: the outbox entry;
//!   it is published again on start (at-least-once).
//!
//! Nothing else in slmd touches sled: the engine under this module can change.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store at {path}: {source}. If it is corrupt, stop slmd, \
         move the directory aside (it holds unprocessed messages and unsent results) and restart"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("store I/O: {0}")]
    Io(#[from] sled::Error),
    #[error("store transaction: {0}")]
    Transaction(String),
    #[error("corrupt entry {key} in tree {tree}")]
    Corrupt { tree: &'static str, key: u64 },
}

/// A received message, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// Wall-clock ms when it was received; latency is measured from here.
    pub received_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A result waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    inbox: sled::Tree,
    outbox: sled::Tree,
    seen: sled::Tree,
}

/// The `seen` key of a message id within a task.
pub fn seen_key(task: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(task.len() + 1 + id.len());
    k.extend_from_slice(task.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        Ok(Store {
            inbox: open("inbox")?,
            outbox: open("outbox")?,
            seen: open("seen")?,
            db,
        })
    }

    /// Appends a received message; durable only after [`Store::flush`].
    pub fn append_inbox(&self, entry: &InboxEntry) -> Result<u64, StoreError> {
        let key = self.db.generate_id()?;
        let mut v = Vec::with_capacity(10 + entry.topic.len() + entry.payload.len());
        v.extend_from_slice(&entry.received_ms.to_be_bytes());
        encode_topic_payload(&mut v, &entry.topic, &entry.payload);
        self.inbox.insert(key.to_be_bytes(), v)?;
        Ok(key)
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Inbox entries with keys above `after` (all when `None`), oldest first.
    pub fn inbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEntry)>, StoreError> {
        let start = after.map_or(0, |k| k + 1);
        self.inbox
            .range(start.to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let key = decode_key(&k);
                let corrupt = StoreError::Corrupt { tree: "inbox", key };
                if v.len() < 8 {
                    return Err(corrupt);
                }
                let received_ms = u64::from_be_bytes(v[..8].try_into().unwrap());
                let (topic, payload) = decode_topic_payload(&v[8..]).ok_or(corrupt)?;
                Ok((
                    key,
                    InboxEntry {
                        received_ms,
                        topic,
                        payload,
                    },
                ))
            })
            .collect()
    }

    /// Moves a message from the inbox to the outbox with its result, and
    /// records it as seen, atomically.
    pub fn complete(
        &self,
        key: u64,
        result: &OutboxEntry,
        seen: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        let mut v = Vec::with_capacity(2 + result.topic.len() + result.payload.len());
        encode_topic_payload(&mut v, &result.topic, &result.payload);
        let k = key.to_be_bytes();
        let now = now_ms().to_be_bytes();
        (&self.inbox, &self.outbox, &self.seen)
            .transaction(|(inbox, outbox, seen_tree)| {
                inbox.remove(&k)?;
                outbox.insert(&k, v.clone())?;
                if let Some(s) = seen {
                    seen_tree.insert(s, &now)?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                StoreError::Transaction(format!("{e:?}"))
            })
    }

    /// Whether a message with this `seen` key was already processed.
    pub fn was_seen(&self, seen: &[u8]) -> Result<bool, StoreError> {
        Ok(self.seen.contains_key(seen)?)
    }

    /// Forgets processed ids older than `window_ms`; returns how many.
    pub fn prune_seen(&self, window_ms: u64) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(window_ms);
        let mut n = 0;
        for kv in self.seen.iter() {
            let (k, v) = kv?;
            let at = v.as_ref().try_into().map_or(0, u64::from_be_bytes);
            if at < cutoff {
                self.seen.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Drops an inbox entry that has nowhere to go (no task matches it).
    pub fn discard_inbox(&self, key: u64) -> Result<(), StoreError> {
        self.inbox.remove(key.to_be_bytes())?;
        Ok(())
    }

    /// Outbox entries in key order, skipping those `skip` says are in flight.
    pub fn outbox_pending(
        &self,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.outbox.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let key = decode_key(&k);
            if skip(key) {
                continue;
            }
            let (topic, payload) = decode_topic_payload(&v).ok_or(StoreError::Corrupt {
                tree: "outbox",
                key,
            })?;
            out.push((key, OutboxEntry { topic, payload }));
        }
        Ok(out)
    }

    /// The broker has the result: forget it.
    pub fn outbox_remove(&self, key: u64) -> Result<(), StoreError> {
        self.outbox.remove(key.to_be_bytes())?;
        Ok(())
    }

    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

fn decode_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

fn encode_topic_payload(v: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    // MQTT topics are at most 65535 bytes, so a u16 length always fits.
    v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(payload);
}

fn decode_topic_payload(v: &[u8]) -> Option<(String, Vec<u8>)> {
    let len = u16::from_be_bytes(v.get(..2)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(2..2 + len)?).ok()?.to_owned();
    Some((topic, v[2 + len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, payload: &[u8]) -> InboxEntry {
        InboxEntry {
            received_ms: 42,
            topic: topic.into(),
            payload: payload.to_vec(),
        }
    }

    #[tokio::test]
    async fn entries_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path()).unwrap();
            let a = store.append_inbox(&entry("t/1", b"one")).unwrap();
            let b = store.append_inbox(&entry("t/2", &[0xff, 0])).unwrap();
            store.flush().await.unwrap();
            (a, b)
        };
        let store = Store::open(dir.path()).unwrap();
        let got = store.inbox_after(None, 10).unwrap();
        assert_eq!(
            got,
            vec![(a, entry("t/1", b"one")), (b, entry("t/2", &[0xff, 0]))]
        );
        assert_eq!(store.inbox_after(Some(a), 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn complete_moves_atomically_and_remove_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k = store.append_inbox(&entry("in", b"x")).unwrap();
        let result = OutboxEntry {
            topic: "out".into(),
            payload: b"{}".to_vec(),
        };
        let seen = seen_key("task", "id-1");
        assert!(!store.was_seen(&seen).unwrap());
        store.complete(k, &result, Some(&seen)).unwrap();
        assert!(store.was_seen(&seen).unwrap());
        assert!(!store.was_seen(&seen_key("task", "id-2")).unwrap());
        assert_eq!(store.prune_seen(60_000).unwrap(), 0, "recent ids are kept");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(store.prune_seen(1).unwrap(), 1, "old ids are forgotten");
        assert!(!store.was_seen(&seen).unwrap());
        assert_eq!(store.inbox_len(), 0);
        assert_eq!(
            store.outbox_pending(10, |_| false).unwrap(),
            vec![(k, result)]
        );
        assert!(store.outbox_pending(10, |key| key == k).unwrap().is_empty());
        store.outbox_remove(k).unwrap();
        assert_eq!(store.outbox_len(), 0);
    }
}
