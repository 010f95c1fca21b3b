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
//! | `seen_order` | ms, seen key  | empty: the dedup records oldest first          |
//! | `dispatched` | inbox id      | empty: handed to the engine, not completed     |
//! | `attempts` | inbox id        | times a crash interrupted it (u32 BE)          |
//! | `meta`     | name            | `format`, `running`, `dead_letters`, `reopened` |
//!
//! Times are wall-clock ms (u64 BE); a topic or correlation data is a u16 BE
//! length then bytes (MQTT bounds both to 65535). Flags: 1 the broker's DUP,
//! 2 a response topic follows, 4 correlation data follows (MQTT 5), 16 the
//! payload was cut to what the receiver keeps: its size (u64 BE) and id
//! (a field) follow.
//! Dedup records are bounded (`limits.max_dedup_bytes`): the oldest go
//! first, by `seen_order`.
//!
//! # What a crash leaves behind
//!
//! - Before the inbox flush: nothing of the message; it was not acknowledged,
//!   so the broker redelivers it (persistent session).
//! - After the flush, before the ack: the entry, and a redelivery of the same
//!   message (DUP set); the router finds it in `seen` and publishes the stored
//!   result again instead of processing it twice.
//! - During processing: the inbox entry, its `dispatched` mark (made
//!   durable as the inference thread takes it into a batch, before
//!   anything is decoded; what waits in the engine's queue is not marked), and `running` still set.
//!   On start each dispatched entry is blamed (`attempts` + 1) and runs one
//!   at a time; one blamed `max_attempts` times goes to the dead letters. A
//!   crash before anything was dispatched (during start-up or the model
//!   load) blames nobody.
//! - A write that fails (a full disk) leaves sled refusing every operation:
//!   the daemon reopens the store in place once writes work again
//!   ([`Store::recover`]); what was not flushed is as after a crash.
//! - After `complete`, before the flush: possibly the inbox entry again (the
//!   completion was not durable); its result was not published, so it is
//!   processed once as far as anyone outside can tell.
//! - After the publish, before the PUBACK is handled: the outbox entry; it is
//!   published again on start, byte for byte (at-least-once).
//!
//! Nothing else in slmd touches sled: the engine under this module can change.

pub mod lock;

use slmd_core::now_ms;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
    #[error("the store is being reopened after a write failure ({0})")]
    Reopening(String),
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
    /// Set when the payload was larger than the receiver keeps: only its
    /// first bytes are stored, and it gets a `too_large` error.
    pub truncated: Option<Truncated>,
}

/// What is kept of a payload that was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// Its size as received.
    pub size: u64,
    /// Its id, taken from the whole payload (its own, or derived from all
    /// of it), so that the sender can match the error to the request.
    pub id: String,
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
    /// Dedup records (ids with their results) and their bytes, bounded by
    /// `limits.max_dedup_bytes`.
    #[serde(default)]
    pub dedup_records: usize,
    #[serde(default)]
    pub dedup_bytes: u64,
    /// Age of the oldest unprocessed message, ms.
    pub oldest_inbox_age_ms: Option<u64>,
    /// Age of the oldest unsent result, ms.
    pub oldest_outbox_age_ms: Option<u64>,
    /// Why the store cannot be written, while it cannot (a full disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_failure: Option<String>,
}

/// How a store is opened: its memory and its dedup bound.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// sled's page cache capacity.
    pub cache_bytes: u64,
    /// Dedup record bytes kept; the oldest go first beyond it.
    pub max_seen_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cache_bytes: 8 << 20,
            max_seen_bytes: 8 << 20,
        }
    }
}

/// The durable store. Clones share one database; when a write fails (a
/// full disk: sled then refuses every operation until reopened),
/// [`Store::recover`] reopens it in place for all of them.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    settings: Settings,
    /// `None` only while a failed database is being reopened.
    trees: RwLock<Option<Arc<Trees>>>,
    tally: Tally,
    /// The last write failure, until a reopen succeeds.
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Counts reopens, so readers holding positions know to start over.
    generation: AtomicU64,
}

struct Trees {
    db: sled::Db,
    inbox: sled::Tree,
    outbox: sled::Tree,
    seen: sled::Tree,
    seen_order: sled::Tree,
    dispatched: sled::Tree,
    attempts: sled::Tree,
    meta: sled::Tree,
}

/// Entries and value bytes of inbox, outbox and dedup records, kept with
/// every write.
#[derive(Default)]
struct Tally {
    inbox: AtomicU64,
    outbox: AtomicU64,
    bytes: AtomicU64,
    seen: AtomicU64,
    seen_bytes: AtomicU64,
}

impl Tally {
    /// One inbox or outbox entry of `len` bytes entered (`+1`) or left
    /// (`-1`) `tree`.
    fn entry(&self, tree: &AtomicU64, len: usize, sign: i8) {
        Tally::count(tree, &self.bytes, len, sign);
    }

    /// One dedup record of `len` bytes entered or left.
    fn seen_entry(&self, len: usize, sign: i8) {
        Tally::count(&self.seen, &self.seen_bytes, len, sign);
    }

    fn count(entries: &AtomicU64, bytes: &AtomicU64, len: usize, sign: i8) {
        if sign > 0 {
            entries.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            entries.fetch_sub(1, Ordering::Relaxed);
            bytes.fetch_sub(len as u64, Ordering::Relaxed);
        }
    }

    fn reset(&self) {
        for a in [
            &self.inbox,
            &self.outbox,
            &self.bytes,
            &self.seen,
            &self.seen_bytes,
        ] {
            a.store(0, Ordering::Relaxed);
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

/// The `seen_order` key: when, then which.
fn order_key(at_ms: u64, seen: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + seen.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(seen);
    k
}

/// sled's refusal to open a database another handle holds.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

impl Trees {
    fn open(path: &Path, settings: &Settings) -> Result<Trees, StoreError> {
        let fail = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        let existed = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
        // sled panics on some damaged files rather than returning an error.
        let attempt = || {
            std::panic::catch_unwind(|| {
                // No background flush every 500 ms: every write that must be
                // durable is flushed by the code that needs it, and an idle
                // device then writes nothing (flash wear).
                sled::Config::new()
                    .path(path)
                    .cache_capacity(settings.cache_bytes)
                    .flush_every_ms(None)
                    .open()
            })
            .map_err(|_| fail("sled could not read its files".into()))
        };
        // sled lets go of its file lock when the last reference to a closed
        // database drops, which one of its threads may hold for a moment
        // after the store itself was dropped (a reopen after a write
        // failure): wait up to a second before calling the store locked.
        let mut opened = attempt()?;
        for _ in 0..50 {
            if !opened.as_ref().is_err_and(is_lock_error) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            opened = attempt()?;
        }
        let db = opened.map_err(|e| match e {
            e if is_lock_error(&e) => StoreError::Locked {
                path: path.to_owned(),
            },
            e => fail(e.to_string()),
        })?;
        let open = |name: &str| db.open_tree(name).map_err(|e| fail(e.to_string()));
        let trees = Trees {
            inbox: open("inbox")?,
            outbox: open("outbox")?,
            seen: open("seen")?,
            seen_order: open("seen_order")?,
            dispatched: open("dispatched")?,
            attempts: open("attempts")?,
            meta: open("meta")?,
            db,
        };
        trees.check_format(path, existed)?;
        Ok(trees)
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

    /// Counts what is stored into `t`; a store written before the dedup
    /// records had an order index gets one.
    fn count(&self, t: &Tally) -> Result<(), StoreError> {
        t.reset();
        for (tree, count) in [(&self.inbox, &t.inbox), (&self.outbox, &t.outbox)] {
            for kv in tree.iter() {
                t.entry(count, kv?.1.len(), 1);
            }
        }
        let index = self.seen_order.is_empty();
        for kv in self.seen.iter() {
            let (k, v) = kv?;
            t.seen_entry(k.len() + v.len(), 1);
            if index {
                self.seen_order.insert(order_key(decode_u64(&v), &k), &[])?;
            }
        }
        Ok(())
    }
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(state_dir, Settings::default())
    }

    pub fn open_with(state_dir: &Path, settings: Settings) -> Result<Store, StoreError> {
        let path = state_dir.join("store");
        let trees = Trees::open(&path, &settings)?;
        let tally = Tally::default();
        trees.count(&tally)?;
        Ok(Store {
            shared: Arc::new(Shared {
                path,
                settings,
                trees: RwLock::new(Some(Arc::new(trees))),
                tally,
                failure: Mutex::new(None),
                failed: AtomicBool::new(false),
                generation: AtomicU64::new(0),
            }),
        })
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        match &*self.shared.trees.read().unwrap() {
            Some(t) => Ok(t.clone()),
            None => Err(StoreError::Reopening(self.failure().unwrap_or_default())),
        }
    }

    /// Notes a failed write: sled fails every later operation, so the
    /// database must be reopened ([`Store::recover`]).
    fn check<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e @ (StoreError::Io(_) | StoreError::Flush(_))) = &r {
            let mut f = self.shared.failure.lock().unwrap();
            if f.is_none() {
                *f = Some(e.to_string());
            }
            self.shared.failed.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Why the store cannot be written, while it cannot.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap().clone()
    }

    /// Whether a write failed and the store awaits [`Store::recover`].
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Changes each time the database is reopened: inbox positions taken
    /// before it may have missed entries that were not made durable.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// After a write failure: reopens the database (blocking; call it on
    /// the blocking pool). sled keeps its on-disk log consistent, so what
    /// was flushed before the failure is all there; what was not is treated
    /// as a crash would treat it. Fails while the old database is still
    /// in use or the disk is still full; call again later.
    pub fn recover(&self) -> Result<(), StoreError> {
        let reason = self.failure().unwrap_or_default();
        // Every clone of the old database must be gone before sled can
        // lock its files again: wait briefly for operations in progress.
        // (None: an earlier attempt closed it already.)
        let mut old = self.shared.trees.write().unwrap().take();
        for _ in 0..200 {
            match old.take().map(Arc::try_unwrap) {
                None | Some(Ok(_)) => break,
                Some(Err(still_shared)) => {
                    old = Some(still_shared);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        if let Some(busy) = old {
            *self.shared.trees.write().unwrap() = Some(busy);
            return Err(StoreError::Reopening(format!(
                "{reason}; the old database is still in use"
            )));
        }
        let reopened = Trees::open(&self.shared.path, &self.shared.settings)
            .and_then(|t| t.count(&self.shared.tally).map(|()| t))
            .and_then(|t| {
                // A write proves the disk takes data again.
                t.meta.insert("reopened", &now_ms().to_be_bytes())?;
                t.db.flush()?;
                Ok(t)
            });
        match reopened {
            Ok(t) => {
                *self.shared.trees.write().unwrap() = Some(Arc::new(t));
                *self.shared.failure.lock().unwrap() = None;
                self.shared.failed.store(false, Ordering::Relaxed);
                self.shared.generation.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Left closed: the next attempt opens it (nothing holds it).
            Err(e) => Err(StoreError::Reopening(format!("{reason}; reopening: {e}"))),
        }
    }

    /// Records that a daemon is running on this store; returns whether the
    /// previous one stopped without [`Store::mark_stopped`] (a crash).
    pub async fn mark_running(&self) -> Result<bool, StoreError> {
        let crashed = self.trees()?.meta.insert("running", &[1])?.is_some();
        self.flush().await?;
        Ok(crashed)
    }

    /// A clean stop: nothing was interrupted, so nothing dispatched is a
    /// suspect.
    pub async fn mark_stopped(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.dispatched.clear()?;
        t.meta.remove("running")?;
        self.flush().await
    }

    /// Appends a received message; durable only after [`Store::flush`].
    pub fn append_inbox(&self, entry: &InboxEntry) -> Result<u64, StoreError> {
        self.check((|| {
            let t = self.trees()?;
            let key = t.db.generate_id()?;
            let v = encode_inbox(entry);
            t.inbox.insert(key.to_be_bytes(), v.as_slice())?;
            self.shared
                .tally
                .entry(&self.shared.tally.inbox, v.len(), 1);
            Ok(key)
        })())
    }

    /// Makes everything written before the call durable (not what other
    /// tasks write while it runs).
    ///
    /// A blocking flush on tokio's blocking pool, not sled's `flush_async`:
    /// in sled 0.34 two overlapping `flush_async` calls can miss their
    /// wake-up and hang (spacejam/sled#1308), and the receiver and the
    /// publisher flush concurrently.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        let flushed = tokio::task::spawn_blocking(move || t.db.flush())
            .await
            .map_err(|e| StoreError::Flush(e.to_string()))
            .and_then(|r| r.map(drop).map_err(StoreError::from));
        self.check(flushed)
    }

    /// Inbox entries with keys above `after` (all when `None`), oldest first.
    pub fn inbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEntry)>, StoreError> {
        let start = after.map_or(0, |k| k + 1);
        self.trees()?
            .inbox
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

    /// Records, durably, that messages are being handed to the model: if
    /// the process dies before they complete, they are suspects. Blocking
    /// (one flush for them all): for the inference thread, which calls it
    /// as they enter a batch.
    pub fn mark_dispatched(&self, keys: &[u64]) -> Result<(), StoreError> {
        self.check((|| {
            let t = self.trees()?;
            for key in keys {
                t.dispatched.insert(key.to_be_bytes(), &[])?;
            }
            t.db.flush()?;
            Ok(())
        })())
    }

    /// The model is done with a message that is not complete yet (it
    /// waits for an upstream): a crash from now on is not its fault.
    /// Durable on return.
    pub async fn unmark_dispatched(&self, key: u64) -> Result<(), StoreError> {
        self.check(
            self.trees()
                .and_then(|t| Ok(t.dispatched.remove(key.to_be_bytes())?)),
        )?;
        self.flush().await
    }

    /// After a crash: every message the last run had dispatched and not
    /// completed gets one more attempt on its record; messages it never
    /// dispatched (a crash during start-up, say) are blamed for nothing.
    /// Each mark turns into its attempt atomically, so a crash during the
    /// blame itself does not blame a message twice for one interruption.
    /// Durable on return.
    pub async fn blame_dispatched(&self) -> Result<usize, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional;
        let t = self.trees()?;
        let marked: Vec<sled::IVec> = t.dispatched.iter().keys().collect::<Result<_, _>>()?;
        let mut blamed = 0;
        for k in marked {
            let hit = (&t.inbox, &t.dispatched, &t.attempts)
                .transaction(|(inbox, dispatched, attempts)| {
                    if dispatched.remove(&k)?.is_none() || inbox.get(&k)?.is_none() {
                        return Ok::<_, ConflictableTransactionError<()>>(false);
                    }
                    let n = attempts.get(&k)?.map_or(0, |v| decode_attempts(&v));
                    attempts.insert(&k, &n.saturating_add(1).to_be_bytes())?;
                    Ok(true)
                })
                .map_err(|e: TransactionError<()>| match e {
                    TransactionError::Storage(e) => StoreError::Io(e),
                    e => StoreError::Transaction(format!("{e:?}")),
                })?;
            blamed += usize::from(hit);
        }
        self.flush().await?;
        Ok(blamed)
    }

    /// How many crashes interrupted this inbox entry.
    pub fn attempts(&self, key: u64) -> Result<u32, StoreError> {
        Ok(self
            .trees()?
            .attempts
            .get(key.to_be_bytes())?
            .map_or(0, |v| decode_attempts(&v)))
    }

    /// Moves a message from the inbox to the outbox with its result, and
    /// records it (with the result) as seen, atomically.
    pub fn complete(
        &self,
        key: u64,
        result: &OutboxEntry,
        seen: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.check(self.commit(key, result, seen, false))?;
        if seen.is_some() {
            self.trim_seen()?;
        }
        Ok(())
    }

    /// Queues a message of slmd's own (not the answer to an inbox message);
    /// durable after [`Store::flush`].
    pub fn publish(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.check((|| {
            let t = self.trees()?;
            let key = t.db.generate_id()?;
            let v = encode_outbox(now_ms(), entry);
            t.outbox.insert(key.to_be_bytes(), v.as_slice())?;
            self.shared
                .tally
                .entry(&self.shared.tally.outbox, v.len(), 1);
            Ok(())
        })())
    }

    /// Like [`Store::complete`] for a message that is given up on: its
    /// dead-letter report goes out instead of a result, and is counted.
    pub fn dead_letter(&self, key: u64, report: &OutboxEntry) -> Result<(), StoreError> {
        self.check(self.commit(key, report, None, true))
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
        let t = self.trees()?;
        let now = now_ms();
        let v = encode_outbox(now, result);
        let k = key.to_be_bytes();
        let (removed, replaced, seen_replaced) = (
            &t.inbox,
            &t.outbox,
            &t.seen,
            &t.seen_order,
            &t.dispatched,
            &t.attempts,
            &t.meta,
        )
            .transaction(
                |(inbox, outbox, seen_tree, order, dispatched, attempts, meta)| {
                    let removed = inbox.remove(&k)?.map(|old| old.len());
                    let replaced = outbox.insert(&k, v.as_slice())?.map(|old| old.len());
                    attempts.remove(&k)?;
                    dispatched.remove(&k)?;
                    let mut seen_replaced = None;
                    if let Some(s) = seen {
                        if let Some(old) = seen_tree.insert(s, v.as_slice())? {
                            order.remove(order_key(decode_u64(&old), s))?;
                            seen_replaced = Some(s.len() + old.len());
                        }
                        order.insert(order_key(now, s), &[])?;
                    }
                    if dead {
                        let n = meta.get("dead_letters")?.map_or(0, |v| decode_u64(&v));
                        meta.insert("dead_letters", &(n + 1).to_be_bytes())?;
                    }
                    Ok::<_, ConflictableTransactionError<()>>((removed, replaced, seen_replaced))
                },
            )
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => StoreError::Io(e),
                e => StoreError::Transaction(format!("{e:?}")),
            })?;
        let t = &self.shared.tally;
        if let Some(len) = removed {
            t.entry(&t.inbox, len, -1);
        }
        if let Some(len) = replaced {
            t.entry(&t.outbox, len, -1);
        }
        t.entry(&t.outbox, v.len(), 1);
        if let Some(s) = seen {
            if let Some(len) = seen_replaced {
                t.seen_entry(len, -1);
            }
            t.seen_entry(s.len() + v.len(), 1);
        }
        Ok(())
    }

    /// The result of a message with this `seen` key and when it was
    /// produced, if it was processed within the last `window_ms`.
    pub fn seen_result(
        &self,
        seen: &[u8],
        window_ms: u64,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let Some(v) = self.trees()?.seen.get(seen)? else {
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
        self.forget_seen(|at| at < cutoff)
    }

    /// Forgets the oldest processed ids while their records exceed the
    /// bound.
    fn trim_seen(&self) -> Result<usize, StoreError> {
        let max = self.shared.settings.max_seen_bytes;
        let bytes = &self.shared.tally.seen_bytes;
        if bytes.load(Ordering::Relaxed) <= max {
            return Ok(0);
        }
        self.forget_seen(|_| bytes.load(Ordering::Relaxed) > max)
    }

    /// Removes dedup records oldest first while `more(at_ms, n)` holds.
    fn forget_seen(&self, more: impl Fn(u64) -> bool) -> Result<usize, StoreError> {
        let t = self.trees()?;
        let mut n = 0;
        for kv in t.seen_order.iter() {
            let (ok, _) = kv?;
            let at = decode_u64(&ok);
            if !more(at) {
                break;
            }
            let key = &ok[8..];
            if let Some(v) = t.seen.remove(key)? {
                self.shared.tally.seen_entry(key.len() + v.len(), -1);
            }
            t.seen_order.remove(&ok)?;
            n += 1;
        }
        Ok(n)
    }

    /// Drops an inbox entry that has nowhere to go (no task matches it).
    pub fn discard_inbox(&self, key: u64) -> Result<(), StoreError> {
        self.check((|| {
            let t = self.trees()?;
            t.attempts.remove(key.to_be_bytes())?;
            t.dispatched.remove(key.to_be_bytes())?;
            if let Some(old) = t.inbox.remove(key.to_be_bytes())? {
                self.shared
                    .tally
                    .entry(&self.shared.tally.inbox, old.len(), -1);
            }
            Ok(())
        })())
    }

    /// Outbox entries in key order, skipping those `skip` says are in flight.
    pub fn outbox_pending(
        &self,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.trees()?.outbox.iter() {
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
        self.check((|| {
            if let Some(old) = self.trees()?.outbox.remove(key.to_be_bytes())? {
                self.shared
                    .tally
                    .entry(&self.shared.tally.outbox, old.len(), -1);
            }
            Ok(())
        })())
    }

    /// Inbox plus outbox bytes, the figure the quota limits.
    pub fn bytes(&self) -> u64 {
        self.shared.tally.bytes.load(Ordering::Relaxed)
    }

    /// The figures; while the store is failed, only what the tally knows.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let t = &self.shared.tally;
        let mut stats = Stats {
            inbox: t.inbox.load(Ordering::Relaxed) as usize,
            outbox: t.outbox.load(Ordering::Relaxed) as usize,
            bytes: self.bytes(),
            dedup_records: t.seen.load(Ordering::Relaxed) as usize,
            dedup_bytes: t.seen_bytes.load(Ordering::Relaxed),
            write_failure: self.failure(),
            ..Stats::default()
        };
        if stats.write_failure.is_some() {
            return Ok(stats);
        }
        let trees = self.trees()?;
        let now = now_ms();
        let age = |first: Option<(sled::IVec, sled::IVec)>| {
            first.map(|(_, v)| now.saturating_sub(decode_u64(&v)))
        };
        stats.dead_letters = trees
            .meta
            .get("dead_letters")?
            .map_or(0, |v| decode_u64(&v));
        stats.oldest_inbox_age_ms = age(trees.inbox.first()?);
        // Outbox keys are inbox keys, so the first is the oldest too.
        stats.oldest_outbox_age_ms = age(trees.outbox.first()?);
        Ok(stats)
    }
}

/// Reopens the store whenever a write failed, retrying with backoff (1 s
/// to 30 s) until it works, and says so once on each change. The receiver
/// holds input at the broker meanwhile, and asks for it again after.
pub async fn heal(store: Store, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    use std::time::Duration;
    let mut backoff = Duration::from_secs(1);
    let mut said: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        if !store.failed() {
            backoff = Duration::from_secs(1);
            continue;
        }
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || s.recover())
            .await
            .unwrap_or_else(|e| Err(StoreError::Reopening(e.to_string())));
        match result {
            Ok(()) => {
                log::info!("the store takes writes again (reopened); resuming");
                said = None;
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                let why = e.to_string();
                if said.as_deref() != Some(why.as_str()) {
                    log::error!(
                        "the store cannot be written: {why}. Input is held at the broker; \
                         retrying with backoff (free space on the state file system)"
                    );
                    said = Some(why);
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The leading u64 BE of a value (a time or a counter); 0 if too short.
fn decode_u64(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// An `attempts` value (u32 BE); 0 if malformed.
fn decode_attempts(v: &[u8]) -> u32 {
    v.try_into().map_or(0, u32::from_be_bytes)
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
/// Inbox only: the payload was cut; its original size (u64 BE) follows.
const TRUNCATED: u8 = 16;

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
    if e.truncated.is_some() {
        flags |= TRUNCATED;
    }
    v.push(flags);
    if let Some(r) = &e.reply {
        put_field(&mut v, r.topic.as_bytes());
    }
    if let Some(c) = correlation {
        put_field(&mut v, c);
    }
    if let Some(t) = &e.truncated {
        v.extend_from_slice(&t.size.to_be_bytes());
        put_field(&mut v, t.id.as_bytes());
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
    let truncated = if flags & TRUNCATED != 0 {
        let size = decode_u64(rest.get(..8)?);
        rest = &rest[8..];
        let id = take_string(&mut rest)?;
        Some(Truncated { size, id })
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
        truncated,
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
            truncated: None,
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
            InboxEntry {
                truncated: Some(Truncated {
                    size: 2 << 20,
                    id: "big-1".into(),
                }),
                ..with_reply(Some(vec![9]))
            },
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
    async fn crashes_blame_only_what_was_dispatched_and_dead_letters_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<u64> = {
            let store = Store::open(dir.path()).unwrap();
            assert!(!store.mark_running().await.unwrap(), "a fresh store");
            let keys: Vec<u64> = (0..4)
                .map(|i| store.append_inbox(&entry("in", &[i])).unwrap())
                .collect();
            store.flush().await.unwrap();
            // Two reached the engine; the others were still waiting.
            store.mark_dispatched(&[keys[0], keys[2]]).unwrap();
            keys
            // Dropped without mark_stopped: a crash.
        };
        let store = Store::open(dir.path()).unwrap();
        assert!(store.mark_running().await.unwrap(), "the last run crashed");
        assert_eq!(store.blame_dispatched().await.unwrap(), 2);
        // A crash during the next start-up, before anything ran: no blame.
        assert_eq!(store.blame_dispatched().await.unwrap(), 0);
        store.mark_dispatched(&keys[..1]).unwrap();
        assert_eq!(store.blame_dispatched().await.unwrap(), 1);
        let attempts: Vec<u32> = keys.iter().map(|&k| store.attempts(k).unwrap()).collect();
        assert_eq!(attempts, [2, 0, 1, 0]);
        store.dead_letter(keys[0], &result("dead")).unwrap();
        store.complete(keys[1], &result("ok"), None).unwrap();
        assert_eq!(
            store.attempts(keys[0]).unwrap(),
            0,
            "forgotten with the entry"
        );
        let stats = store.stats().unwrap();
        assert_eq!((stats.inbox, stats.outbox, stats.dead_letters), (2, 2, 1));
        assert!(
            stats.oldest_inbox_age_ms.unwrap() > 1000,
            "received_ms is 42"
        );
        assert!(stats.oldest_outbox_age_ms.unwrap() < 60_000);
        // Dispatched, then a clean stop: not a suspect.
        store.mark_dispatched(&keys[3..4]).unwrap();
        store.mark_stopped().await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.mark_running().await.unwrap(), "a clean stop");
        assert_eq!(store.blame_dispatched().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn dedup_records_are_bounded_oldest_first_and_counted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            max_seen_bytes: 4000,
            ..Settings::default()
        };
        let store = Store::open_with(dir.path(), settings).unwrap();
        let payload = "r".repeat(80);
        for i in 0..200 {
            let k = store.append_inbox(&entry("in", b"x")).unwrap();
            let seen = seen_key("task", &format!("id-{i:03}"));
            store.complete(k, &result(&payload), Some(&seen)).unwrap();
            store.outbox_remove(k).unwrap();
        }
        let stats = store.stats().unwrap();
        assert!(stats.dedup_bytes <= 4000, "{stats:?}");
        assert!(stats.dedup_records > 20, "{stats:?}");
        let has = |i: usize| {
            store
                .seen_result(&seen_key("task", &format!("id-{i:03}")), 60_000)
                .unwrap()
                .is_some()
        };
        assert!(has(199), "the newest is kept");
        assert!(!has(0), "the oldest went first");
        // Replacing a record does not count it twice.
        let k = store.append_inbox(&entry("in", b"x")).unwrap();
        let before = store.stats().unwrap().dedup_records;
        store
            .complete(k, &result(&payload), Some(&seen_key("task", "id-199")))
            .unwrap();
        assert_eq!(store.stats().unwrap().dedup_records, before);
        store.flush().await.unwrap();
        let counted = store.stats().unwrap();
        drop(store);
        let store = Store::open_with(dir.path(), settings).unwrap();
        let reopened = store.stats().unwrap();
        assert_eq!(
            (reopened.dedup_records, reopened.dedup_bytes),
            (counted.dedup_records, counted.dedup_bytes)
        );
        assert_eq!(store.prune_seen(0).unwrap(), counted.dedup_records);
        assert_eq!(store.stats().unwrap().dedup_bytes, 0);
    }

    #[test]
    fn a_second_opener_and_a_foreign_format_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("locked");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        let t = store.trees().unwrap();
        t.meta.insert("format", &1u32.to_be_bytes()).unwrap();
        t.db.flush().unwrap();
        drop(t);
        drop(store);
        let err = Store::open(dir.path()).err().expect("format 1");
        assert!(
            matches!(err, StoreError::Format { found: Some(1), .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}

/// A full disk, for real: a small tmpfs (needs root, as CI has; skipped
/// with a message elsewhere).
#[cfg(test)]
mod disk_full {
    use super::*;

    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(bytes: u64) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().ok()?;
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
                .arg("tmpfs")
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[tokio::test]
    async fn a_store_that_hit_a_full_disk_reopens_in_place_and_keeps_what_was_flushed() {
        let Some(fs) = Tmpfs::mount(24 << 20) else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return;
        };
        let state = fs.0.path().join("state");
        let store = Store::open(&state).unwrap();
        let entry = |i: u32| InboxEntry {
            received_ms: 1,
            dup: false,
            reply: None,
            topic: "t".into(),
            payload: format!("{i:04}").repeat(200).into_bytes(),
            truncated: None,
        };
        let kept = store.append_inbox(&entry(0)).unwrap();
        store.flush().await.unwrap();
        // Fill the file system, then write until sled fails.
        let ballast = fs.0.path().join("ballast");
        let mut f = std::fs::File::create(&ballast).unwrap();
        let block = vec![7u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let mut failed_at = None;
        for i in 1..20_000 {
            let wrote = store.append_inbox(&entry(i)).map(drop);
            let flushed = match wrote {
                Ok(()) => store.flush().await,
                Err(e) => Err(e),
            };
            if flushed.is_err() {
                failed_at = Some(i);
                break;
            }
        }
        let failed_at = failed_at.expect("a full disk fails a write");
        eprintln!("write failed at {failed_at}: {:?}", store.failure());
        assert!(store.failed(), "the failure is noted");
        assert!(store.stats().unwrap().write_failure.is_some());
        // Still full: reopening fails and says so, the store stays failed.
        let s = store.clone();
        let still = tokio::task::spawn_blocking(move || s.recover())
            .await
            .unwrap();
        assert!(still.is_err(), "reopened on a full disk?");
        assert!(store.failed());
        std::fs::remove_file(&ballast).unwrap();
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.recover())
            .await
            .unwrap()
            .expect("reopens once space is back");
        assert!(!store.failed());
        assert_eq!(store.generation(), 1);
        let keys: Vec<u64> = store
            .inbox_after(None, 100_000)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys.first(), Some(&kept), "what was flushed is there");
        assert!(
            keys.len() <= failed_at as usize,
            "{} > {failed_at}",
            keys.len()
        );
        // And it takes writes again, counted right.
        let k = store.append_inbox(&entry(99_999)).unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.stats().unwrap().inbox, keys.len() + 1);
        assert_eq!(
            store.inbox_after(None, 100_000).unwrap().last().unwrap().0,
            k
        );
    }
}
