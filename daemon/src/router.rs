//! The router: takes stored messages from the inbox in receive order, finds
//! each one's task, runs it through the engine, and commits the result (or a
//! structured error) to the outbox in one atomic step.
//!
//! At most `limits.max_in_flight` messages are being inferred at once; they
//! reach the engine together, which batches them. On start the router begins
//! at the oldest inbox entry, so whatever a crash interrupted runs again:
//! entries the store blamed for a crash run one at a time, so a message that
//! crashes the daemon takes no neighbour down with it, and one blamed
//! `limits.max_attempts` times goes to the dead-letter topic instead.
//!
//! A message already processed within the dedup window (same task and id;
//! for id-less messages, same topic and payload) is not processed again: its
//! stored result is published again, so a producer that retries gets it.
//!
//! An MQTT 5 request that names a response topic gets its result (or error)
//! there, with its correlation data, if `limits.response_topics` allows the
//! topic and it is not one of slmd's own input topics; otherwise it gets a
//! `response_topic_refused` error on the task's error topic.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::{Limits, Protocol, TaskConfig};
use crate::hermes;
use crate::injection;
use crate::monitor::{MonitorError, Monitors, Verdict};
use crate::payload::{self, DeadLetter, ErrorBody, ErrorResult, TaskResult};
use slmd_core::now_ms;
use slmd_core::topic;
use slmd_engine::{Engine, EngineError};
use slmd_store::{self as store, InboxEntry, OutboxEntry, Reply, Store};

/// What a configuration reload replaces, as one unit: the engine (with the
/// tasks' trained heads), the tasks and the limits. A message takes the
/// routing current when it starts and finishes on it, so a reload never
/// changes a message half-way; the old engine stops when its last message
/// is done.
pub struct Routing {
    pub engine: Engine,
    pub tasks: Vec<TaskConfig>,
    pub limits: Limits,
    /// Monitor tasks' sensor windows: new with every routing, so a reload
    /// starts them afresh.
    pub monitors: Monitors,
}

pub struct Router {
    pub store: Store,
    routing: RwLock<Arc<Routing>>,
    /// Woken by the receiver after new messages are durable.
    pub inbox_wake: Arc<Notify>,
    /// Woken after a result enters the outbox.
    pub outbox_wake: Arc<dyn Fn() + Send + Sync>,
    /// `seen` keys of messages being processed: a redelivery that arrives
    /// while its original is still in flight is a duplicate too.
    in_flight: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Inbox keys of messages being processed, so that re-reading the
    /// inbox after the store was reopened does not start them twice.
    running: std::sync::Mutex<std::collections::HashSet<u64>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Model update requests: the control topic and where they go.
    control: Option<Control>,
    /// The last speed (km/h) each policy state topic reported, and when.
    speeds: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

/// Model update requests arrive on `topic`. Installs go to the updater
/// (`tx`); transfer chunks are written here. Each request is answered
/// with a retained status on `status_topic`.
pub struct Control {
    pub topic: String,
    pub status_topic: String,
    pub trust: crate::bundle::Trust,
    pub require_signed: bool,
    /// Entity injections must be signed too (they change what slmd
    /// answers).
    pub require_signed_injection: bool,
    /// This device's client id: a signed request naming another device is
    /// refused.
    pub device: String,
    /// The highest sequence number of a signed request accepted (replays).
    pub sequence: crate::bundle::control::Sequence,
    pub transfers: Arc<crate::bundle::transfer::Transfers>,
    /// Topic filters no response topic may match (slmd's own topics).
    pub reserved: Vec<String>,
    pub tx: tokio::sync::mpsc::Sender<crate::supervisor::Job>,
}

/// Where a message goes; decided once, in inbox order, as it leaves the
/// inbox.
enum Route {
    /// A model update request on the control topic.
    Control,
    /// A Hermes entity injection.
    Inject,
    /// A vehicle state report for the policy of task `.0`.
    State(usize),
    /// A message for task `.0`; a monitor task's reading comes judged.
    Task(usize, Option<Result<Verdict, MonitorError>>),
    /// No task consumes the topic.
    Nowhere,
}

impl Router {
    pub fn new(
        store: Store,
        routing: Routing,
        inbox_wake: Arc<Notify>,
        outbox_wake: Arc<dyn Fn() + Send + Sync>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Router {
        Router {
            store,
            routing: RwLock::new(Arc::new(routing)),
            inbox_wake,
            outbox_wake,
            in_flight: Default::default(),
            running: Default::default(),
            metrics,
            control: None,
            speeds: Default::default(),
        }
    }

    pub fn with_control(self, control: Control) -> Router {
        Router {
            control: Some(control),
            ..self
        }
    }

    /// The chunked transfers the control topic receives.
    pub fn transfers(&self) -> Option<Arc<crate::bundle::transfer::Transfers>> {
        self.control.as_ref().map(|c| c.transfers.clone())
    }

    /// A model update request: parsed (and its signature checked), then
    /// queued for the updater or written as a transfer chunk; acknowledged
    /// with a retained status.
    async fn control(&self, c: &Control, key: u64, entry: InboxEntry) {
        use crate::bundle::control::{self, Request};
        use crate::bundle::transfer::Progress;
        let rules = control::Rules {
            trust: &c.trust,
            require_signed: c.require_signed,
            device: &c.device,
        };
        // A signed request with a sequence number must be newer than any
        // accepted before; announcing an open transfer again (to resume
        // it) is the one repeat allowed.
        let parsed = control::parse(&entry.payload, &rules).and_then(|p| {
            let resume = matches!(&p.request, Request::Start(s) if c.transfers.is_open(s));
            match p.seq {
                Some(seq) if !resume => c.sequence.advance(seq).map(|()| p),
                _ => Ok(p),
            }
        });
        let job = |req, transfer| crate::supervisor::Job::Update { req, transfer };
        let queue = |j: crate::supervisor::Job| match c.tx.try_send(j) {
            Ok(()) => serde_json::json!({"state": "received"}),
            Err(_) => serde_json::json!({
                "state": "refused", "reason": "busy", "detail": "an update is already queued"
            }),
        };
        let status = match parsed.map(|p| p.request) {
            Err(e) => refusal(&e),
            Ok(Request::Install {
                source,
                activate,
                force,
                size,
            }) => queue(job(
                crate::bundle::update::Request {
                    source,
                    activate,
                    force,
                    network: Some(size.unwrap_or(u64::MAX)),
                },
                None,
            )),
            Ok(request) => {
                let transfers = c.transfers.clone();
                let chunk = matches!(request, Request::Chunk(_));
                let progress = tokio::task::spawn_blocking(move || match request {
                    Request::Start(s) => transfers.start(s),
                    Request::Chunk(ch) => transfers.chunk(ch),
                    Request::Install { .. } => unreachable!("handled above"),
                })
                .await
                .unwrap_or_else(|e| Err(crate::bundle::BundleError::BadRequest(e.to_string())));
                match progress {
                    Err(e) => refusal(&e),
                    Ok(Progress::Ignored) => {
                        self.settle(key, None);
                        return;
                    }
                    Ok(Progress::Receiving {
                        id,
                        received,
                        chunks,
                        missing,
                    }) => {
                        // Every 16th chunk is answered, and every
                        // announcement (which is how a sender asks again).
                        if chunk && received % 16 != 0 {
                            self.settle(key, None);
                            return;
                        }
                        serde_json::json!({
                            "state": "receiving", "transfer": id, "received": received,
                            "chunks": chunks, "missing": missing
                        })
                    }
                    Ok(Progress::Complete {
                        path,
                        activate,
                        force,
                    }) => {
                        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                        // The file is slmd's own, its size bounded already.
                        let req = crate::bundle::update::Request {
                            source: path.to_string_lossy().into_owned(),
                            activate,
                            force,
                            network: None,
                        };
                        queue(job(req, id))
                    }
                }
            }
        };
        let out = OutboxEntry {
            retain: true,
            ..json_entry(&c.status_topic, &status)
        };
        self.settle(key, Some(out));
    }

    /// An entity injection request: checked here, applied by the
    /// supervisor (which answers it once the new engine serves).
    async fn inject(&self, key: u64, entry: InboxEntry) {
        let id = injection::request_id(&entry.payload);
        let refused = |reason: &str, why: String| {
            log::warn!(reason = reason; "entity injection refused: {why}");
            let body = injection::refusal(id.as_deref(), reason, &why);
            Some(json_entry(injection::ERROR_TOPIC, &body))
        };
        let Some(c) = &self.control else {
            let out = refused("unavailable", "this router has no supervisor".into());
            self.settle(key, out);
            return;
        };
        let rules = crate::bundle::control::Rules {
            trust: &c.trust,
            require_signed: c.require_signed_injection,
            device: &c.device,
        };
        // Signature and device first; the sequence number advances only
        // for a request that parses.
        let out = match crate::bundle::control::unwrap_signed(&entry.payload, &rules) {
            Err(e) => refused(e.reason(), e.to_string()),
            Ok((payload, seq)) => match injection::parse(&payload) {
                Err(e) => refused(e.reason(), e.to_string()),
                Ok(req) => match seq.map_or(Ok(()), |n| c.sequence.advance(n)) {
                    Err(e) => refused(e.reason(), e.to_string()),
                    Ok(()) => match c.tx.send(crate::supervisor::Job::Inject(req)).await {
                        Ok(()) => None,
                        Err(_) => refused("unavailable", "the supervisor has stopped".into()),
                    },
                },
            },
        };
        self.settle(key, out);
    }

    /// A vehicle state report `{"speed_kmh": N}` for `task`'s policy; a
    /// report that cannot be read gets an error result.
    fn vehicle_state(&self, task: &TaskConfig, entry: &InboxEntry) -> Option<OutboxEntry> {
        let speed = serde_json::from_slice::<serde_json::Value>(&entry.payload)
            .ok()
            .and_then(|v| v.get("speed_kmh")?.as_f64())
            .filter(|s| s.is_finite() && *s >= 0.0);
        match speed {
            Some(s) => {
                let now = std::time::Instant::now();
                self.speeds
                    .lock()
                    .unwrap()
                    .insert(entry.topic.clone(), (s, now));
                None
            }
            None => Some(self.error(
                task,
                entry,
                "bad_state",
                "a vehicle state is {\"speed_kmh\": <number >= 0>}".into(),
            )),
        }
    }

    /// The freshest speed reported on `policy`'s state topic, if recent.
    fn speed(&self, policy: &crate::policy::PolicyConfig) -> Option<f64> {
        let filter = policy.state_topic.as_deref()?;
        let max_age = std::time::Duration::from_secs(policy.state_max_age_secs);
        self.speeds
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, (_, at))| topic::matches(filter, t) && at.elapsed() <= max_age)
            .max_by_key(|(_, (_, at))| *at)
            .map(|(_, (s, _))| *s)
    }

    /// Removes a message from the inbox, with an answer or without.
    fn settle(&self, key: u64, out: Option<OutboxEntry>) {
        let done = match out {
            Some(out) => self.store.complete(key, &out, None),
            None => self.store.discard_inbox(key),
        };
        match done {
            Ok(()) => (self.outbox_wake)(),
            Err(e) => log::error!("cannot settle message {key}: {e}"),
        }
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap().clone()
    }

    /// From the next message on (a configuration reload).
    pub fn replace(&self, routing: Routing) {
        *self.routing.write().unwrap() = Arc::new(routing);
    }

    /// Runs until shutdown, then waits up to `drain` for messages in flight.
    /// Returns an error only when the engine is gone (the daemon must stop).
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) -> Result<(), EngineError> {
        // Fixed for the life of the process (a reload does not resize it).
        let max_in_flight = self.routing().limits.max_in_flight;
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let all = max_in_flight as u32;
        let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<EngineError>(1);
        let mut cursor = None;
        let mut generation = self.store.generation();
        let mut pruned_at = std::time::Instant::now() - Duration::from_secs(3600);
        'outer: loop {
            if pruned_at.elapsed() > Duration::from_secs(60) {
                pruned_at = std::time::Instant::now();
                let window = self.routing().limits.dedup_window_secs;
                match self.store.prune_seen(window * 1000) {
                    Ok(0) => {}
                    Ok(n) => log::debug!("forgot {n} processed id(s) older than the dedup window"),
                    Err(e) => log::error!("cannot prune processed ids: {e}"),
                }
            }
            if self.store.generation() != generation {
                // Reopened after a write failure: completions that did not
                // reach the disk left their messages in the inbox again.
                generation = self.store.generation();
                cursor = None;
            }
            let batch = match self.store.inbox_after(cursor, 64) {
                Ok(b) => b,
                Err(e) => {
                    // A failed store is reported by the healer, once.
                    if !self.store.failed() {
                        log::error!("cannot read the inbox: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => break,
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.inbox_wake.notified() => continue,
                    _ = shutdown.changed() => break,
                    Some(e) = fatal_rx.recv() => return Err(e),
                }
            }
            for (key, entry) in batch {
                if self.running.lock().unwrap().contains(&key) {
                    cursor = Some(key);
                    continue;
                }
                let attempts = self.store.attempts(key).unwrap_or_else(|e| {
                    log::error!("cannot read the attempts of message {key}: {e}");
                    0
                });
                // A suspect of a crash runs alone.
                let n = if attempts > 0 { all } else { 1 };
                let permit = tokio::select! {
                    p = permits.clone().acquire_many_owned(n) => p.expect("semaphore is never closed"),
                    _ = shutdown.changed() => break 'outer,
                    Some(e) = fatal_rx.recv() => return Err(e),
                };
                cursor = Some(key);
                // Routed here, in inbox order, before the message goes its
                // own way: a monitor task's readings are judged now (rates
                // need the order).
                let routing = self.routing();
                let route = self.route(&routing, &entry, attempts);
                let this = self.clone();
                let fatal = fatal_tx.clone();
                self.running.lock().unwrap().insert(key);
                tokio::spawn(async move {
                    if let Err(e) = this.process(key, entry, attempts, routing, route).await {
                        let _ = fatal.try_send(e);
                    }
                    this.running.lock().unwrap().remove(&key);
                    drop(permit);
                });
            }
        }
        if tokio::time::timeout(drain, permits.acquire_many(all))
            .await
            .is_err()
        {
            log::warn!(
                "shutdown: messages still in flight after {} ms stay in the inbox",
                drain.as_millis()
            );
        }
        Ok(())
    }

    /// Where a message goes. A monitor task's reading is judged on the way
    /// (unless it is bound for the dead letters).
    fn route(&self, routing: &Routing, entry: &InboxEntry, attempts: u32) -> Route {
        let topic = entry.topic.as_str();
        if self.control.as_ref().is_some_and(|c| c.topic == topic) {
            return Route::Control;
        }
        let tasks = &routing.tasks;
        if topic == injection::PERFORM_TOPIC && tasks.iter().any(|t| t.protocol == Protocol::Hermes)
        {
            return Route::Inject;
        }
        let state = |t: &TaskConfig| {
            let filter = t.policy.as_ref().and_then(|p| p.state_topic.as_deref());
            filter.is_some_and(|f| topic::matches(f, topic))
        };
        if let Some(i) = tasks.iter().position(state) {
            return Route::State(i);
        }
        let Some(i) = tasks
            .iter()
            .position(|t| t.topics.iter().any(|f| topic::matches(f, topic)))
        else {
            return Route::Nowhere;
        };
        // A cut payload is answered too_large, not judged.
        let verdict = (attempts < routing.limits.max_attempts && entry.truncated.is_none())
            .then(|| {
                routing.monitors.observe(
                    &tasks[i].name,
                    &entry.payload,
                    routing.limits.max_payload_bytes,
                    entry.received_ms as f64 / 1000.0,
                )
            })
            .flatten();
        Route::Task(i, verdict)
    }

    async fn process(
        &self,
        key: u64,
        entry: InboxEntry,
        attempts: u32,
        routing: Arc<Routing>,
        route: Route,
    ) -> Result<(), EngineError> {
        let (task, verdict) = match route {
            Route::Control => {
                if let Some(c) = &self.control {
                    self.control(c, key, entry).await;
                }
                return Ok(());
            }
            Route::Inject => {
                self.inject(key, entry).await;
                return Ok(());
            }
            Route::State(i) => {
                let out = self.vehicle_state(&routing.tasks[i], &entry);
                self.settle(key, out);
                return Ok(());
            }
            Route::Nowhere => {
                log::warn!("no task consumes topic {}; message dropped", entry.topic);
                self.settle(key, None);
                return Ok(());
            }
            Route::Task(i, verdict) => (&routing.tasks[i], verdict),
        };
        if attempts >= routing.limits.max_attempts {
            let dead = DeadLetter::new(&task.name, &entry.topic, &entry.payload, attempts);
            log::error!(
                task = task.name.as_str(),
                msg_id = dead.id.as_str(),
                topic = entry.topic.as_str(),
                reason = "too_many_attempts";
                "interrupted by {attempts} crash(es); sent to {}",
                routing.limits.dead_letter_topic
            );
            let report = json_entry(&routing.limits.dead_letter_topic, &dead);
            match self.store.dead_letter(key, &report) {
                Ok(()) => (self.outbox_wake)(),
                Err(e) => log::error!("cannot commit dead letter {key}: {e}"),
            }
            return Ok(());
        }
        if let Some(verdict) = verdict {
            return self.monitored(key, &entry, task, &routing, verdict).await;
        }
        let own_id = match &entry.truncated {
            Some(t) => Some(t.id.clone()),
            None => payload::own_id(&entry.payload),
        };
        // An id-less copy the broker does not call a redelivery may be the
        // user repeating themselves: only a short window applies to it.
        let window_secs = if own_id.is_some() || entry.dup {
            routing.limits.dedup_window_secs
        } else {
            routing.limits.content_dedup_window_secs
        };
        let id = own_id.unwrap_or_else(|| payload::derived_id(&entry.topic, &entry.payload));
        let seen = store::seen_key(&task.name, &dedup_id(&id, entry.reply.as_ref()));
        let racing = !self.in_flight.lock().unwrap().insert(seen.clone());
        let before = if racing {
            None
        } else {
            self.store
                .seen_result(&seen, window_secs * 1000)
                .unwrap_or_else(|e| {
                    log::error!("cannot check whether {id} was processed: {e}");
                    None
                })
        };
        if racing || before.is_some() {
            if !racing {
                self.in_flight.lock().unwrap().remove(&seen);
            }
            log::info!(
                task = task.name.as_str(),
                msg_id = id.as_str();
                "already processed (redelivery); not processed again"
            );
            self.metrics.duplicate(&task.name);
            // The original still in flight publishes its own result.
            self.settle(key, before);
            return Ok(());
        }
        let reserved = self.control.as_ref().map_or(&[][..], |c| &c.reserved[..]);
        let reply = routing.reply_to(&entry, reserved);
        // A Hermes task's `hermes/nlu/intentParsed` copy, when it asks for one.
        let mut announce = None;
        let parsed = match &entry.truncated {
            Some(t) => Err(payload::InputError::TooLarge {
                size: t.size as usize,
                limit: routing.limits.max_payload_bytes,
            }),
            None => payload::parse(task.protocol, &entry.topic, &entry.payload, &routing.limits),
        };
        let out = match (&reply, parsed) {
            (Err(why), _) => self.error(task, &entry, "response_topic_refused", why.clone()),
            (_, Err(e)) => self.error(task, &entry, e.reason(), e.to_string()),
            (Ok(_), Ok(req)) => match self.dispatch(key, &routing, &task.name, req.query()).await {
                Ok(scores) => {
                    let latency = now_ms().saturating_sub(entry.received_ms) as f64;
                    let mut result = TaskResult::new(
                        req.id.clone(),
                        &task.name,
                        &scores,
                        &routing.engine.model,
                        latency,
                    );
                    log::info!(
                        task = task.name.as_str(),
                        msg_id = req.id.as_str(),
                        topic = entry.topic.as_str(),
                        label = scores.label.as_deref().unwrap_or("-"),
                        confidence:% = result.confidence,
                        latency_ms = result.latency_ms,
                        model_sha256 = routing.engine.model.sha256.as_str();
                        "result"
                    );
                    self.metrics.result(
                        &task.name,
                        &crate::metrics::Observed {
                            recognised: scores.label.is_some(),
                            latency_ms: result.latency_ms,
                            inference_ms: scores.inference_ms,
                            tokens: scores.tokens,
                        },
                    );
                    match &req.session {
                        None => {
                            // Hermes answers carry no action; only JSON results decide one.
                            result.action = task.policy.as_ref().map(|p| {
                                p.decide(&crate::policy::Command {
                                    topic: &entry.topic,
                                    text: &req.text,
                                    intent: scores.label.as_deref(),
                                    confidence: result.confidence,
                                    slots: scores.slots.as_deref().unwrap_or_default(),
                                    speed_kmh: self.speed(p),
                                })
                            });
                            json_entry(&task.output_topic, &result)
                        }
                        Some(session) => {
                            let (topic, body) =
                                hermes::answer(&task.output_topic, session, &req.text, &scores);
                            if task.hermes_intent_parsed {
                                announce = hermes::parsed(&body).map(|(t, b)| json_entry(&t, &b));
                            }
                            json_entry(&topic, &body)
                        }
                    }
                }
                Err(EngineError::Stopped) => return Err(EngineError::Stopped),
                Err(e @ EngineError::TooLong { .. }) => {
                    self.error(task, &entry, "text_too_long", e.to_string())
                }
                Err(e) => self.error(task, &entry, "inference_failed", e.to_string()),
            },
        };
        let out = match reply {
            Ok(Some(r)) => OutboxEntry {
                topic: r.topic.clone(),
                correlation: r.correlation.clone(),
                ..out
            },
            _ => out,
        };
        // Queued before the result commits, so a crash in between repeats
        // the announcement with the rerun message rather than losing it.
        if let Some(a) = &announce {
            if let Err(e) = self.store.publish(a) {
                log::error!("cannot queue the intentParsed of message {key}: {e}");
            }
        }
        match self.store.complete(key, &out, Some(&seen)) {
            Ok(()) => (self.outbox_wake)(),
            // The message stays in the inbox and runs again on restart.
            Err(e) => log::error!("cannot commit the result of message {key}: {e}"),
        }
        self.in_flight.lock().unwrap().remove(&seen);
        Ok(())
    }

    /// A monitor task's reading, judged already: nothing to say, an error
    /// result, or a note whose cause the model picks.
    ///
    /// Readings are not deduplicated by id as commands are: a redelivered
    /// reading carries its own time stamp, so it lands in the window as
    /// one more sample of the same instant, and the judgement had to
    /// happen in order before a dedup lookup could.
    async fn monitored(
        &self,
        key: u64,
        entry: &InboxEntry,
        task: &TaskConfig,
        routing: &Routing,
        verdict: Result<Verdict, MonitorError>,
    ) -> Result<(), EngineError> {
        let facts = match verdict {
            Ok(Verdict::Normal | Verdict::Held) => {
                self.settle(key, None);
                return Ok(());
            }
            Err(e) => {
                let out = self.error(task, entry, e.reason(), e.to_string());
                self.settle(key, Some(out));
                return Ok(());
            }
            Ok(Verdict::Note(facts)) => facts,
        };
        let (cause, confidence, inference_ms, tokens) = match self
            .dispatch(key, routing, &task.name, facts.describe())
            .await
        {
            Ok(s) => {
                let conf = s.ranked.first().map(|r| r.1);
                (s.label, conf, s.inference_ms, s.tokens)
            }
            Err(EngineError::Stopped) => return Err(EngineError::Stopped),
            Err(e) => {
                // The facts matter more than the cause: the note goes
                // out without one.
                log::error!(task = task.name.as_str(); "no cause for the note: {e}");
                (None, None, 0.0, 0)
            }
        };
        let latency = now_ms().saturating_sub(entry.received_ms) as f64;
        let note = crate::monitor::note::Note {
            id: message_id(entry),
            task: &task.name,
            sentence: facts.sentence(cause.as_deref()),
            facts: &facts,
            cause_confidence: cause.as_ref().and(confidence),
            cause,
            model: &routing.engine.model,
            latency_ms: latency,
        };
        log::info!(
            task = task.name.as_str(),
            msg_id = note.id.as_str(),
            sensor = facts.sensor.as_str(),
            detector = facts.detector.as_str(),
            count = facts.count,
            cause = note.cause.as_deref().unwrap_or("-");
            "note: {}",
            note.sentence
        );
        self.metrics.result(
            &task.name,
            &crate::metrics::Observed {
                recognised: note.cause.is_some(),
                latency_ms: latency,
                inference_ms,
                tokens,
            },
        );
        self.settle(key, Some(json_entry(&task.output_topic, &note)));
        Ok(())
    }

    /// Hands a message to the engine, once its `dispatched` mark is durable:
    /// only what reached the engine is blamed if the process dies.
    async fn dispatch(
        &self,
        key: u64,
        routing: &Routing,
        task: &str,
        query: impl Into<slmd_engine::Query>,
    ) -> Result<slmd_engine::Scores, EngineError> {
        if let Err(e) = self.store.mark_dispatched(key).await {
            // Inference goes ahead: the store's trouble is reported and
            // healed elsewhere, and a lost mark only spares it a blame.
            log::debug!("message {key} dispatched unmarked: {e}");
        }
        routing.engine.infer(task, query).await
    }

    fn error(
        &self,
        task: &TaskConfig,
        entry: &InboxEntry,
        reason: &str,
        message: String,
    ) -> OutboxEntry {
        let id = message_id(entry);
        log::warn!(
            task = task.name.as_str(),
            msg_id = id.as_str(),
            topic = entry.topic.as_str(),
            reason = reason;
            "rejected: {message}"
        );
        self.metrics.error(&task.name, reason);
        if task.protocol == Protocol::Hermes {
            let session = hermes::Session::of_payload(&entry.payload);
            return json_entry(
                &task.error_topic(),
                &hermes::error(&session, reason, &message),
            );
        }
        let err = ErrorResult {
            id,
            task: task.name.clone(),
            topic: entry.topic.clone(),
            error: ErrorBody {
                reason: reason.to_owned(),
                message,
            },
        };
        json_entry(&task.error_topic(), &err)
    }
}

impl Routing {
    pub fn new(engine: Engine, tasks: Vec<TaskConfig>, limits: Limits) -> Routing {
        Routing {
            monitors: Monitors::new(&tasks),
            engine,
            tasks,
            limits,
        }
    }

    /// The request's response topic, if it has one slmd may publish to:
    /// allowed by `limits.response_topics`, and none of slmd's own topics
    /// (`reserved`, its input topics) nor a `$` topic.
    fn reply_to<'a>(
        &self,
        entry: &'a InboxEntry,
        reserved: &[String],
    ) -> Result<Option<&'a Reply>, String> {
        let Some(reply) = &entry.reply else {
            return Ok(None);
        };
        let name = &reply.topic;
        topic::check_name(name).map_err(|why| format!("response topic {name:?}: {why}"))?;
        if name.starts_with('$') {
            return Err(format!(
                "response topic {name:?}: a $ topic is the broker's"
            ));
        }
        let own = |f: &String| topic::matches(f, name);
        let state = |t: &TaskConfig| {
            let filter = t.policy.as_ref().and_then(|p| p.state_topic.as_deref());
            filter.is_some_and(|f| topic::matches(f, name))
        };
        if reserved.iter().any(own)
            || name == injection::PERFORM_TOPIC
            || name == &self.limits.dead_letter_topic
            || self.tasks.iter().any(state)
        {
            return Err(format!(
                "response topic {name:?} is one of slmd's own topics (control, status, \
                 injection or state)"
            ));
        }
        if !self
            .limits
            .response_topics
            .iter()
            .any(|f| topic::matches(f, name))
        {
            return Err(format!(
                "response topic {name:?} is not allowed by limits.response_topics"
            ));
        }
        let input = |t: &TaskConfig| t.topics.iter().any(|f| topic::matches(f, name));
        if self.tasks.iter().any(input) {
            return Err(format!(
                "response topic {name:?} is one of slmd's input topics (the result would loop back in)"
            ));
        }
        Ok(Some(reply))
    }
}

/// The id to report for a message, even one that fails to parse or was
/// cut (its id was taken from the whole payload).
fn message_id(entry: &InboxEntry) -> String {
    match &entry.truncated {
        Some(t) => t.id.clone(),
        None => payload::id_of(&entry.topic, &entry.payload),
    }
}

/// What identifies a request for dedup: its id, and where its answer goes.
/// Two requests with the same text (so the same derived id) but different
/// response topics or correlation data are two requests, each answered.
fn dedup_id(id: &str, reply: Option<&Reply>) -> String {
    match reply {
        None => id.to_owned(),
        Some(r) => {
            let correlation = r.correlation.as_deref().map(hex::encode);
            format!(
                "{id}\u{0}{}\u{0}{}",
                r.topic,
                correlation.unwrap_or_default()
            )
        }
    }
}

fn refusal(e: &crate::bundle::BundleError) -> serde_json::Value {
    log::warn!(reason = e.reason(); "model control request refused: {e}");
    serde_json::json!({"state": "refused", "reason": e.reason(), "detail": e.to_string()})
}

fn json_entry(topic: &str, value: &impl Serialize) -> OutboxEntry {
    OutboxEntry {
        topic: topic.to_owned(),
        correlation: None,
        payload: serde_json::to_vec(value).expect("results always serialise"),
        retain: false,
    }
}
