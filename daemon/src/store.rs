//! The durable store: an inbox of received messages and an outbox of results
//! waiting for the broker, in one sled database under `<state>/store`.
//!
//! # Invariants
//!
//! - A message is acknowledged to the broker only after its inbox entry is
//!   flushed to disk ([`Store::flush`]). Until then the broker still owns it.
//! - Inbox keys are sled's monotonic ids (big-endian `u64`), so key order is
//!   receive order, across restarts.
//! - A processed message leaves the inbox and enters the outbox with its
//!   result in one sled transaction ([`Store::complete`]), under the same key:
//!   it is either unprocessed or processed-with-its-result, never both, never
//!   neither. The same transaction records its id in `seen`, with the result.
//! - A result is published only after a flush that began after it was
//!   written (the publisher reads a batch, then flushes, then sends), so a
//!   published result never belongs to a completion a crash could undo; it
//!   is removed from the outbox only when the broker acknowledged it.
//! - A tally (entries and value bytes of inbox and outbox) is counted once
//!   at open and kept with every write, so status and the quota check never
//!   scan a tree; the receiver stops taking messages while the bytes are
//!   above the configured quota.
//!
//! # Key layout
//!
//! | tree       | key             | value                                          |
//! |------------|-----------------|------------------------------------------------|
//! | `inbox`    | id (u64 BE)     | received ms, flags, [reply], topic, payload    |
//! | `outbox`   | same id         | created ms, flags, [correlation], topic, payload |
//! | `seen`     | task, 0, msg id | as `outbox`: the result, to replay on redelivery |
//! | `attempts` | inbox id        | times a crash interrupted it (u32 BE)          |
//! | `meta`     | name            | `format`, `running`, `dead_letters`            |
//!
//! Times are wall-clock ms (u64 BE); a topic or correlation data is a u16 BE
//! length then bytes (MQTT bounds both to 65535). Flags: 1 the broker's DUP,
//! 2 a response topic follows, 4 correlation data follows (MQTT 5).
//!
//! # What a crash leaves behind
//!
//! - Before the inbox flush: nothing of the message; it was not acknowledged,
//!   so the broker redelivers it (persistent session).
//! - After the flush, before the ack: the entry, and a redelivery of the same
//!   message (DUP set); the router finds it in `seen` and publishes the stored
//!   result again instead of processing it twice.
//! - During processing: the inbox entry, and `running` still set. On start
//!   the oldest `max_in_flight` entries are blamed (`attempts` + 1) and run
//!   one at a time; one blamed `max_attempts` times goes to the dead letters.
//! - After `complete`, before the flush: possibly the inbox entry again (the
//!   completion was not durable); its result was not published, so it is
//!   processed once as far as anyone outside can tell.
//! - After the publish, before the PUBACK is handled: the outbox entry; it is
//!   published again on start, byte for byte (at-least-once).
//!
//! Nothing else in slmd touches sled: the engine under this module can change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The layout above; a store written in another one is refused, not guessed.
const FORMAT: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store at {path}: {reason}. It holds unprocessed messages and unsent \
         results, so slmd never wipes it: if it is corrupt, stop slmd, move the directory \
         aside (keep it for inspection) and restart with an empty one"
    )]
    Open { path: PathBuf, reason: String },
    #[error(
        "the store at {path} is in use by another process (is slmd already running with this \
         state directory?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "the store at {path} is in {}, this slmd reads format {FORMAT}. Drain it \
         with the slmd that wrote it, or move it aside and restart with an empty one",
        format_name(*.found)
    )]
    Format { path: PathBuf, found: Option<u32> },
    #[error("store I/O: {0}")]
    Io(#[from] sled::Error),
    #[error("store flush did not finish: {0}")]
    Flush(String),
    #[error("store transaction: {0}")]
    Transaction(String),
    #[error("corrupt entry {key} in tree {tree}")]
    Corrupt { tree: &'static str, key: u64 },
}

fn format_name(found: Option<u32>) -> String {
    match found {
        Some(n) => format!("format {n}"),
        None => "the unversioned format of slmd before format 2".into(),
    }
}

/// A received message, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// Wall-clock ms when it was received; latency is measured from here.
    pub received_ms: u64,
    /// The broker's DUP flag: it may have delivered this message before.
    pub dup: bool,
    /// Where the sender asked for the result (MQTT 5 response topic).
    pub reply: Option<Reply>,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// An MQTT 5 request's response topic and correlation data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// A result waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub topic: String,
    /// Echoed from the request, for the requester to match its answer.
    pub correlation: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Published with the MQTT retain flag (status messages).
    pub retain: bool,
}

/// What `slmd status` reports about the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub inbox: usize,
    pub outbox: usize,
    pub dead_letters: u64,
    /// Inbox plus outbox values, the figure the quota limits.
    pub bytes: u64,
    /// Age of the oldest unprocessed message, ms.
    pub oldest_inbox_age_ms: Option<u64>,
    /// Age of the oldest unsent result, ms.
    pub oldest_outbox_age_ms: Option<u64>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    inbox: sled::Tree,
    outbox: sled::Tree,
    seen: sled::Tree,
    attempts: sled::Tree,
    meta: sled::Tree,
    tally: Arc<Tally>,
}

/// Entries and value bytes of inbox and outbox, kept with every write.
#[derive(Default)]
struct Tally {
    inbox: AtomicU64,
    outbox: AtomicU64,
    bytes: AtomicU64,
}

impl Tally {
    /// One entry of `len` bytes entered (`+1`) or left (`-1`) `tree`.
    fn entry(&self, tree: &AtomicU64, len: usize, sign: i8) {
        if sign > 0 {
            tree.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            tree.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(len as u64, Ordering::Relaxed);
        }
    }
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
        let fail = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        let existed = std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some());
        // sled panics on some damaged files rather than returning an error.
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(&path).open())
            .map_err(|_| fail("sled could not read its files".into()))?;
        let db = opened.map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked { path: path.clone() }
            }
            e => fail(e.to_string()),
        })?;
        let open = |name: &str| db.open_tree(name).map_err(|e| fail(e.to_string()));
        let store = Store {
            inbox: open("inbox")?,
            outbox: open("outbox")?,
            seen: open("seen")?,
            attempts: open("attempts")?,
            meta: open("meta")?,
            tally: Arc::default(),
            db,
        };
        store.check_format(&path, existed)?;
        let t = &store.tally;
        for (tree, count) in [(&store.inbox, &t.inbox), (&store.outbox, &t.outbox)] {
            for kv in tree.iter() {
                t.entry(count, kv?.1.len(), 1);
            }
        }
        Ok(store)
    }

    /// A new store gets the format written (and flushed) at once, so an
    /// existing store without it is damaged, not new: sled may open
    /// unreadable files as empty, and that must not pass as a fresh start.
    fn check_format(&self, path: &Path, existed: bool) -> Result<(), StoreError> {
        let found = self
            .meta
            .get("format")?
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes));
        let empty = self.inbox.is_empty() && self.outbox.is_empty() && self.seen.is_empty();
        match found {
            Some(FORMAT) => Ok(()),
            None if empty && existed => Err(StoreError::Open {
                path: path.to_owned(),
                reason: "its files hold no readable slmd data (damaged, or not an slmd store)"
                    .into(),
            }),
            None if empty => {
                self.meta.insert("format", &FORMAT.to_be_bytes())?;
                self.db.flush()?;
                Ok(())
            }
            found => Err(StoreError::Format {
                path: path.to_owned(),
                found,
            }),
        }
    }

    /// Records that a daemon is running on this store; returns whether the
    /// previous one stopped without [`Store::mark_stopped`] (a crash).
    pub async fn mark_running(&self) -> Result<bool, StoreError> {
        let crashed = self.meta.insert("running", &[1])?.is_some();
        self.flush().await?;
        Ok(crashed)
    }

    /// A clean stop: nothing was interrupted.
    pub async fn mark_stopped(&self) -> Result<(), StoreError> {
        self.meta.remove("running")?;
        self.flush().await
    }

    /// Appends a received message; durable only after [`Store::flush`].
    pub fn append_inbox(&self, entry: &InboxEntry) -> Result<u64, StoreError> {
        let key = self.db.generate_id()?;
        let v = encode_inbox(entry);
        self.inbox.insert(key.to_be_bytes(), v.as_slice())?;
        self.tally.entry(&self.tally.inbox, v.len(), 1);
        Ok(key)
    }

    /// Makes everything written before the call durable (not what other
    /// tasks write while it runs).
    ///
    /// A blocking flush on tokio's blocking pool, not sled's `flush_async`:
    /// in sled 0.34 two overlapping `flush_async` calls can miss their
    /// wake-up and hang (spacejam/sled#1308), and the receiver and the
    /// publisher flush concurrently.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))??;
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
                let entry = decode_inbox(&v).ok_or(StoreError::Corrupt { tree: "inbox", key })?;
                Ok((key, entry))
            })
            .collect()
    }

    /// After a crash: the `n` oldest inbox entries were the ones in flight,
    /// so each gets one more attempt on its record. Durable on return.
    pub async fn blame_oldest(&self, n: usize) -> Result<usize, StoreError> {
        let mut blamed = 0;
        for kv in self.inbox.iter().take(n) {
            let (k, _) = kv?;
            self.attempts.update_and_fetch(&k, |old| {
                let n = old.and_then(|v| v.try_into().ok().map(u32::from_be_bytes));
                Some(n.unwrap_or(0).saturating_add(1).to_be_bytes().to_vec())
            })?;
            blamed += 1;
        }
        self.flush().await?;
        Ok(blamed)
    }

    /// How many crashes interrupted this inbox entry.
    pub fn attempts(&self, key: u64) -> Result<u32, StoreError> {
        Ok(self
            .attempts
            .get(key.to_be_bytes())?
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(0))
    }

    /// Moves a message from the inbox to the outbox with its result, and
    /// records it (with the result) as seen, atomically.
    pub fn complete(
        &self,
        key: u64,
        result: &OutboxEntry,
        seen: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.commit(key, result, seen, false)
    }

    /// Queues a message of slmd's own (not the answer to an inbox message);
    /// durable after [`Store::flush`].
    pub fn publish(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        let key = self.db.generate_id()?;
        let v = encode_outbox(now_ms(), entry);
        self.outbox.insert(key.to_be_bytes(), v.as_slice())?;
        self.tally.entry(&self.tally.outbox, v.len(), 1);
        Ok(())
    }

    /// Like [`Store::complete`] for a message that is given up on: its
    /// dead-letter report goes out instead of a result, and is counted.
    pub fn dead_letter(&self, key: u64, report: &OutboxEntry) -> Result<(), StoreError> {
        self.commit(key, report, None, true)
    }

    fn commit(
        &self,
        key: u64,
        result: &OutboxEntry,
        seen: Option<&[u8]>,
        dead: bool,
    ) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional;
        let now = now_ms();
        let v = encode_outbox(now, result);
        let k = key.to_be_bytes();
        let (removed, replaced) = (
            &self.inbox,
            &self.outbox,
            &self.seen,
            &self.attempts,
            &self.meta,
        )
            .transaction(|(inbox, outbox, seen_tree, attempts, meta)| {
                let removed = inbox.remove(&k)?.map(|old| old.len());
                let replaced = outbox.insert(&k, v.as_slice())?.map(|old| old.len());
                attempts.remove(&k)?;
                if let Some(s) = seen {
                    seen_tree.insert(s, v.as_slice())?;
                }
                if dead {
                    let n = meta.get("dead_letters")?.map_or(0, |v| decode_u64(&v));
                    meta.insert("dead_letters", &(n + 1).to_be_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<()>>((removed, replaced))
            })
            .map_err(|e: TransactionError<()>| StoreError::Transaction(format!("{e:?}")))?;
        let t = &self.tally;
        if let Some(len) = removed {
            t.entry(&t.inbox, len, -1);
        }
        if let Some(len) = replaced {
            t.entry(&t.outbox, len, -1);
        }
        t.entry(&t.outbox, v.len(), 1);
        Ok(())
    }

    /// The result of a message with this `seen` key and when it was
    /// produced, if it was processed within the last `window_ms`.
    pub fn seen_result(
        &self,
        seen: &[u8],
        window_ms: u64,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let Some(v) = self.seen.get(seen)? else {
            return Ok(None);
        };
        let (at, entry) = decode_outbox(&v).ok_or(StoreError::Corrupt {
            tree: "seen",
            key: 0,
        })?;
        Ok((now_ms().saturating_sub(at) <= window_ms).then_some(entry))
    }

    /// Forgets processed ids older than `window_ms`; returns how many.
    pub fn prune_seen(&self, window_ms: u64) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(window_ms);
        let mut n = 0;
        for kv in self.seen.iter() {
            let (k, v) = kv?;
            if decode_u64(&v) < cutoff {
                self.seen.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Drops an inbox entry that has nowhere to go (no task matches it).
    pub fn discard_inbox(&self, key: u64) -> Result<(), StoreError> {
        self.attempts.remove(key.to_be_bytes())?;
        if let Some(old) = self.inbox.remove(key.to_be_bytes())? {
            self.tally.entry(&self.tally.inbox, old.len(), -1);
        }
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
            let (_, entry) = decode_outbox(&v).ok_or(StoreError::Corrupt {
                tree: "outbox",
                key,
            })?;
            out.push((key, entry));
        }
        Ok(out)
    }

    /// The broker has the result: forget it.
    pub fn outbox_remove(&self, key: u64) -> Result<(), StoreError> {
        if let Some(old) = self.outbox.remove(key.to_be_bytes())? {
            self.tally.entry(&self.tally.outbox, old.len(), -1);
        }
        Ok(())
    }

    /// Inbox plus outbox bytes, the figure the quota limits.
    pub fn bytes(&self) -> u64 {
        self.tally.bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let now = now_ms();
        let age = |first: Option<(sled::IVec, sled::IVec)>| {
            first.map(|(_, v)| now.saturating_sub(decode_u64(&v)))
        };
        Ok(Stats {
            inbox: self.tally.inbox.load(Ordering::Relaxed) as usize,
            outbox: self.tally.outbox.load(Ordering::Relaxed) as usize,
            dead_letters: self.meta.get("dead_letters")?.map_or(0, |v| decode_u64(&v)),
            bytes: self.bytes(),
            oldest_inbox_age_ms: age(self.inbox.first()?),
            // Outbox keys are inbox keys, so the first is the oldest too.
            oldest_outbox_age_ms: age(self.outbox.first()?),
        })
    }
}

/// The leading u64 BE of a value (a time or a counter); 0 if too short.
fn decode_u64(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn decode_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

const DUP: u8 = 1;
const REPLY: u8 = 2;
const CORRELATION: u8 = 4;
/// Outbox only; entries without it (all of format 3 before it) are not
/// retained.
const RETAIN: u8 = 8;

/// Appends a u16 BE length and the bytes (callers pass MQTT-bounded data).
fn put_field(v: &mut Vec<u8>, bytes: &[u8]) {
    v.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    v.extend_from_slice(bytes);
}

fn take_field<'a>(v: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u16::from_be_bytes(v.get(..2)?.try_into().ok()?) as usize;
    let field = v.get(2..2 + len)?;
    *v = &v[2 + len..];
    Some(field)
}

fn take_string(v: &mut &[u8]) -> Option<String> {
    Some(std::str::from_utf8(take_field(v)?).ok()?.to_owned())
}

fn encode_inbox(e: &InboxEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + e.topic.len() + e.payload.len());
    v.extend_from_slice(&e.received_ms.to_be_bytes());
    let mut flags = if e.dup { DUP } else { 0 };
    let correlation = e.reply.as_ref().and_then(|r| r.correlation.as_deref());
    if e.reply.is_some() {
        flags |= REPLY;
    }
    if correlation.is_some() {
        flags |= CORRELATION;
    }
    v.push(flags);
    if let Some(r) = &e.reply {
        put_field(&mut v, r.topic.as_bytes());
    }
    if let Some(c) = correlation {
        put_field(&mut v, c);
    }
    put_field(&mut v, e.topic.as_bytes());
    v.extend_from_slice(&e.payload);
    v
}

fn decode_inbox(v: &[u8]) -> Option<InboxEntry> {
    let received_ms = decode_u64(v);
    let flags = *v.get(8)?;
    let mut rest = &v[9..];
    let reply_topic = if flags & REPLY != 0 {
        Some(take_string(&mut rest)?)
    } else {
        None
    };
    let correlation = if flags & CORRELATION != 0 {
        Some(take_field(&mut rest)?.to_vec())
    } else {
        None
    };
    let topic = take_string(&mut rest)?;
    Some(InboxEntry {
        received_ms,
        dup: flags & DUP != 0,
        reply: reply_topic.map(|topic| Reply { topic, correlation }),
        topic,
        payload: rest.to_vec(),
    })
}

fn encode_outbox(at_ms: u64, e: &OutboxEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + e.topic.len() + e.payload.len());
    v.extend_from_slice(&at_ms.to_be_bytes());
    let retain = if e.retain { RETAIN } else { 0 };
    match &e.correlation {
        Some(c) => {
            v.push(CORRELATION | retain);
            put_field(&mut v, c);
        }
        None => v.push(retain),
    }
    put_field(&mut v, e.topic.as_bytes());
    v.extend_from_slice(&e.payload);
    v
}

fn decode_outbox(v: &[u8]) -> Option<(u64, OutboxEntry)> {
    let flags = *v.get(8)?;
    let mut rest = &v[9..];
    let correlation = if flags & CORRELATION != 0 {
        Some(take_field(&mut rest)?.to_vec())
    } else {
        None
    };
    let topic = take_string(&mut rest)?;
    let entry = OutboxEntry {
        topic,
        correlation,
        payload: rest.to_vec(),
        retain: flags & RETAIN != 0,
    };
    Some((decode_u64(v), entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, payload: &[u8]) -> InboxEntry {
        InboxEntry {
            received_ms: 42,
            dup: topic.ends_with("dup"),
            reply: None,
            topic: topic.into(),
            payload: payload.to_vec(),
        }
    }

    fn result(payload: &str) -> OutboxEntry {
        OutboxEntry {
            topic: "out".into(),
            correlation: None,
            payload: payload.into(),
            retain: false,
        }
    }

    #[test]
    fn response_topic_and_correlation_round_trip() {
        let with_reply = |correlation: Option<Vec<u8>>| InboxEntry {
            reply: Some(Reply {
                topic: "app/replies/7".into(),
                correlation,
            }),
            ..entry("t/dup", b"{}")
        };
        for e in [
            with_reply(Some(vec![0, 1, 0xff])),
            with_reply(None),
            with_reply(Some(Vec::new())),
            entry("t", b""),
        ] {
            assert_eq!(decode_inbox(&encode_inbox(&e)), Some(e));
        }
        let out = OutboxEntry {
            correlation: Some(b"req-9".to_vec()),
            ..result("{}")
        };
        assert_eq!(
            decode_outbox(&encode_outbox(5, &out)),
            Some((5, out.clone()))
        );
        let retained = OutboxEntry {
            retain: true,
            ..out
        };
        assert_eq!(
            decode_outbox(&encode_outbox(6, &retained)),
            Some((6, retained))
        );
        // A truncated value is corrupt, not misread.
        let v = encode_inbox(&with_reply(Some(vec![1, 2, 3])));
        assert_eq!(decode_inbox(&v[..v.len() - 6]), None);
    }

    #[tokio::test]
    async fn entries_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path()).unwrap();
            let a = store.append_inbox(&entry("t/1", b"one")).unwrap();
            let b = store.append_inbox(&entry("t/dup", &[0xff, 0])).unwrap();
            store.flush().await.unwrap();
            (a, b)
        };
        let store = Store::open(dir.path()).unwrap();
        let got = store.inbox_after(None, 10).unwrap();
        assert_eq!(
            got,
            vec![(a, entry("t/1", b"one")), (b, entry("t/dup", &[0xff, 0]))]
        );
        assert!(got[1].1.dup);
        assert_eq!(store.inbox_after(Some(a), 10).unwrap().len(), 1);
        assert_eq!(
            store.bytes(),
            2 * 11 + 3 + 3 + 5 + 2,
            "bytes are recounted on open"
        );
    }

    #[tokio::test]
    async fn complete_moves_atomically_and_remove_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k = store.append_inbox(&entry("in", b"x")).unwrap();
        let seen = seen_key("task", "id-1");
        assert_eq!(store.seen_result(&seen, 60_000).unwrap(), None);
        store.complete(k, &result("{}"), Some(&seen)).unwrap();
        assert_eq!(
            store.seen_result(&seen, 60_000).unwrap(),
            Some(result("{}"))
        );
        assert_eq!(
            store
                .seen_result(&seen_key("task", "id-2"), 60_000)
                .unwrap(),
            None
        );
        assert_eq!(store.prune_seen(60_000).unwrap(), 0, "recent ids are kept");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            store.seen_result(&seen, 1).unwrap(),
            None,
            "outside the window"
        );
        assert_eq!(store.prune_seen(1).unwrap(), 1, "old ids are forgotten");
        assert_eq!(store.seen_result(&seen, 60_000).unwrap(), None);
        assert_eq!(store.stats().unwrap().inbox, 0);
        assert_eq!(
            store.outbox_pending(10, |_| false).unwrap(),
            vec![(k, result("{}"))]
        );
        assert!(store.outbox_pending(10, |key| key == k).unwrap().is_empty());
        assert_eq!(store.bytes(), 8 + 1 + 2 + 3 + 2);
        store.outbox_remove(k).unwrap();
        assert_eq!(store.stats().unwrap(), Stats::default());
    }

    #[tokio::test]
    async fn crashes_blame_the_oldest_and_dead_letters_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<u64> = {
            let store = Store::open(dir.path()).unwrap();
            assert!(!store.mark_running().await.unwrap(), "a fresh store");
            let keys = (0..3)
                .map(|i| store.append_inbox(&entry("in", &[i])).unwrap())
                .collect();
            store.flush().await.unwrap();
            keys
            // Dropped without mark_stopped: a crash.
        };
        let store = Store::open(dir.path()).unwrap();
        assert!(store.mark_running().await.unwrap(), "the last run crashed");
        assert_eq!(store.blame_oldest(2).await.unwrap(), 2);
        assert_eq!(store.blame_oldest(1).await.unwrap(), 1);
        let attempts: Vec<u32> = keys.iter().map(|&k| store.attempts(k).unwrap()).collect();
        assert_eq!(attempts, [2, 1, 0]);
        store.dead_letter(keys[0], &result("dead")).unwrap();
        store.complete(keys[1], &result("ok"), None).unwrap();
        assert_eq!(
            store.attempts(keys[0]).unwrap(),
            0,
            "forgotten with the entry"
        );
        let stats = store.stats().unwrap();
        assert_eq!((stats.inbox, stats.outbox, stats.dead_letters), (1, 2, 1));
        assert!(
            stats.oldest_inbox_age_ms.unwrap() > 1000,
            "received_ms is 42"
        );
        assert!(stats.oldest_outbox_age_ms.unwrap() < 60_000);
        store.mark_stopped().await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.mark_running().await.unwrap(), "a clean stop");
    }

    #[test]
    fn a_second_opener_and_a_foreign_format_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("locked");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        store.meta.insert("format", &1u32.to_be_bytes()).unwrap();
        store.db.flush().unwrap();
        drop(store);
        let err = Store::open(dir.path()).err().expect("format 1");
        assert!(
            matches!(err, StoreError::Format { found: Some(1), .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
