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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::answer;
use crate::config::{Limits, Protocol, TaskConfig};
use crate::control::Control;
use crate::escalate::{self, Escalator};
use crate::injection;
use crate::metrics::{Metrics, Observed};
use crate::monitor::{MonitorError, Monitors, Verdict};
use crate::payload::{self, json_entry, DeadLetter};
use crate::policy::state::Speeds;
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
    /// Tasks' escalations, by task name.
    pub escalators: HashMap<String, Arc<Escalator>>,
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
    in_flight: Mutex<HashSet<Vec<u8>>>,
    /// Inbox keys of messages being processed, so that re-reading the
    /// inbox after the store was reopened does not start them twice.
    running: Mutex<HashSet<u64>>,
    pub metrics: Arc<Metrics>,
    /// Model update requests and entity injections.
    pub control: Control,
    /// The vehicle's speed, for the tasks' policies.
    speeds: Speeds,
    /// Marks messages `dispatched` as the inference thread takes them.
    admit: slmd_engine::Admit,
    /// MQTT escalations waiting for their answers.
    pending: escalate::Pending,
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
    /// An upstream's answer to an escalation.
    Escalation,
    /// A message for task `.0`; a monitor task's reading comes judged.
    Task(usize, Option<Result<Verdict, MonitorError>>),
    /// No task consumes the topic.
    Nowhere,
}

impl Router {
    pub fn new(
        store: Store,
        routing: Routing,
        control: Control,
        inbox_wake: Arc<Notify>,
        outbox_wake: Arc<dyn Fn() + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Router {
        let marks = store.clone();
        let admit: slmd_engine::Admit = Arc::new(move |keys: &[u64]| {
            if let Err(e) = marks.mark_dispatched(keys) {
                // Inference goes ahead: the store's trouble is reported and
                // healed elsewhere, and a lost mark only spares a blame.
                log::debug!("message(s) {keys:?} dispatched unmarked: {e}");
            }
        });
        Router {
            admit,
            store,
            routing: RwLock::new(Arc::new(routing)),
            inbox_wake,
            outbox_wake,
            in_flight: Default::default(),
            running: Default::default(),
            metrics,
            control,
            speeds: Speeds::default(),
            pending: escalate::Pending::default(),
        }
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
                if let Route::Escalation = route {
                    // Here, in arrival order: the first valid answer wins.
                    self.escalation_answer(key, &entry);
                    continue;
                }
                let this = self.clone();
                let fatal = fatal_tx.clone();
                self.running.lock().unwrap().insert(key);
                tokio::spawn(async move {
                    let done = this.process(key, entry, attempts, routing, route, permit);
                    if let Err(e) = done.await {
                        let _ = fatal.try_send(e);
                    }
                    this.running.lock().unwrap().remove(&key);
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
        if self.control.topic == topic {
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
        let reply = |e: &Arc<Escalator>| e.config.reply_topic.as_deref() == Some(topic);
        if routing.escalators.values().any(reply) {
            return Route::Escalation;
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
        permit: OwnedSemaphorePermit,
    ) -> Result<(), EngineError> {
        let (task, verdict) = match route {
            Route::Control => {
                let out = self.control.request(&entry.payload).await;
                self.settle(key, out);
                return Ok(());
            }
            Route::Inject => {
                let out = self.control.inject(&entry.payload).await;
                self.settle(key, out);
                return Ok(());
            }
            Route::State(i) => {
                let out = self
                    .speeds
                    .report(&entry.topic, &entry.payload)
                    .err()
                    .map(|why| self.reject(&routing.tasks[i], &entry, "bad_state", why.into()));
                self.settle(key, out);
                return Ok(());
            }
            Route::Escalation => unreachable!("answers are handed over in the router's loop"),
            Route::Nowhere => {
                log::warn!("no task consumes topic {}; message dropped", entry.topic);
                self.settle(key, None);
                return Ok(());
            }
            Route::Task(i, verdict) => (&routing.tasks[i], verdict),
        };
        if attempts >= routing.limits.max_attempts {
            self.dead_letter(key, &entry, task, &routing.limits, attempts);
            return Ok(());
        }
        if attempts > 0 {
            log::warn!(
                task = task.name.as_str(),
                msg_id = dedup_identity(&entry, &routing.limits).0.as_str(),
                attempts = attempts;
                "suspect: a crash interrupted it {attempts} time(s); it runs alone"
            );
        }
        if let Some(verdict) = verdict {
            return self.monitored(key, &entry, task, &routing, verdict).await;
        }
        let (id, window_secs) = dedup_identity(&entry, &routing.limits);
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
        // Held until the result is committed (the shutdown drain waits for
        // it), unless an escalation gives it up to wait.
        let mut permit = Some(permit);
        let (out, announce) = self
            .answer(key, &entry, task, &routing, &mut permit)
            .await?;
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
        // Only now: a redelivery racing the commit is still a duplicate.
        self.in_flight.lock().unwrap().remove(&seen);
        Ok(())
    }

    /// Parses a message, runs it through the engine and shapes the answer
    /// (with the intentParsed copy a Hermes task may add), addressed to
    /// the request's response topic when it names an allowed one.
    async fn answer(
        &self,
        key: u64,
        entry: &InboxEntry,
        task: &TaskConfig,
        routing: &Routing,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<(OutboxEntry, Option<OutboxEntry>), EngineError> {
        let reply = routing.reply_to(entry, &self.control.reserved);
        let parsed = match &entry.truncated {
            Some(t) => Err(payload::InputError::TooLarge {
                size: t.size as usize,
                limit: routing.limits.max_payload_bytes,
            }),
            None => payload::parse(task.protocol, &entry.topic, &entry.payload, &routing.limits),
        };
        let (out, announce) = match (&reply, parsed) {
            (Err(why), _) => (
                self.reject(task, entry, "response_topic_refused", why.clone()),
                None,
            ),
            (_, Err(e)) => (self.reject(task, entry, e.reason(), e.to_string()), None),
            (Ok(_), Ok(req)) => match self.dispatch(key, routing, &task.name, req.query()).await {
                Ok(scores) => {
                    let (scores, escalation) = match routing.escalators.get(&task.name) {
                        Some(e) if e.wanted(&scores) => {
                            // The model is done with it: a crash from here
                            // on is not the message's fault, and the wait
                            // holds no place among the messages in flight.
                            if let Err(e) = self.store.unmark_dispatched(key).await {
                                log::error!("message {key} stays marked as with the model: {e}");
                            }
                            drop(permit.take());
                            let (s, r) = self.escalate(e, key, entry, task, &req, &scores).await;
                            (s, Some(r))
                        }
                        _ => (scores, None),
                    };
                    let speed = task.policy.as_ref().and_then(|p| self.speeds.latest(p));
                    let a = answer::result(
                        task,
                        entry,
                        &req,
                        &scores,
                        escalation.as_ref(),
                        &routing.engine.model,
                        speed,
                    );
                    log::info!(
                        task = task.name.as_str(),
                        msg_id = req.id.as_str(),
                        topic = entry.topic.as_str(),
                        label = scores.label.as_deref().unwrap_or("-"),
                        confidence:% = a.confidence,
                        latency_ms = a.latency_ms,
                        model_sha256 = routing.engine.model.sha256.as_str();
                        "result"
                    );
                    self.metrics.result(
                        &task.name,
                        &Observed {
                            recognised: scores.label.is_some(),
                            latency_ms: a.latency_ms,
                            inference_ms: scores.inference_ms,
                            tokens: scores.tokens,
                        },
                    );
                    (a.out, a.announce)
                }
                Err(EngineError::Stopped) => return Err(EngineError::Stopped),
                Err(e @ EngineError::TooLong { .. }) => (
                    self.reject(task, entry, "text_too_long", e.to_string()),
                    None,
                ),
                Err(e) => (
                    self.reject(task, entry, "inference_failed", e.to_string()),
                    None,
                ),
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
        Ok((out, announce))
    }

    /// A message interrupted by `attempts` crashes goes to the dead-letter
    /// topic instead of running again.
    fn dead_letter(
        &self,
        key: u64,
        entry: &InboxEntry,
        task: &TaskConfig,
        limits: &Limits,
        attempts: u32,
    ) {
        let dead = DeadLetter::new(&task.name, &entry.topic, &entry.payload, attempts);
        log::error!(
            task = task.name.as_str(),
            msg_id = dead.id.as_str(),
            topic = entry.topic.as_str(),
            reason = "too_many_attempts";
            "interrupted by {attempts} crash(es); sent to {}",
            limits.dead_letter_topic
        );
        let report = json_entry(&limits.dead_letter_topic, &dead);
        match self.store.dead_letter(key, &report) {
            Ok(()) => (self.outbox_wake)(),
            Err(e) => log::error!("cannot commit dead letter {key}: {e}"),
        }
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
                let out = self.reject(task, entry, e.reason(), e.to_string());
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
            id: answer::message_id(entry),
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
            &Observed {
                recognised: note.cause.is_some(),
                latency_ms: latency,
                inference_ms,
                tokens,
            },
        );
        self.settle(key, Some(json_entry(&task.output_topic, &note)));
        Ok(())
    }

    /// Hands a message to the engine. Its `dispatched` mark is made durable
    /// as the inference thread takes it into a batch, before anything is
    /// decoded: only what reached the model is blamed if the process dies,
    /// not what waited in the engine's queue.
    async fn dispatch(
        &self,
        key: u64,
        routing: &Routing,
        task: &str,
        query: impl Into<slmd_engine::Query>,
    ) -> Result<slmd_engine::Scores, EngineError> {
        let admit = Some((key, self.admit.clone()));
        routing.engine.infer_admitted(task, query, admit).await
    }

    /// Hands an upstream's answer to the escalation waiting for it.
    fn escalation_answer(&self, key: u64, entry: &InboxEntry) {
        if !self.pending.deliver(&entry.payload) {
            log::info!(
                topic = entry.topic.as_str();
                "an escalation answer no request waits for (late, or not ours); dropped"
            );
        }
        self.settle(key, None);
    }

    /// Asks `task`'s upstream about a doubtful local answer.
    async fn escalate(
        &self,
        e: &Escalator,
        key: u64,
        entry: &InboxEntry,
        task: &TaskConfig,
        req: &payload::Request,
        local: &slmd_engine::Scores,
    ) -> (slmd_engine::Scores, escalate::Report) {
        let among = req
            .session
            .as_ref()
            .and_then(|s| s.intent_filter.as_deref());
        let ask = escalate::Ask {
            // The inbox key makes it unique (two requests may share an id)
            // and the same after a restart.
            correlation: format!("{}:{}:{key}", task.name, req.id),
            task: &task.name,
            text: &req.text,
            context: &req.context,
            among,
            local,
            received_ms: entry.received_ms,
        };
        let outbox = escalate::Outbox {
            store: &self.store,
            wake: &*self.outbox_wake,
        };
        let (scores, report) = e.resolve(&ask, &self.pending, &outbox).await;
        self.metrics.escalation(&task.name, report.outcome);
        (scores, report)
    }

    /// An error result for `task`, counted.
    fn reject(
        &self,
        task: &TaskConfig,
        entry: &InboxEntry,
        reason: &str,
        message: String,
    ) -> OutboxEntry {
        self.metrics.error(&task.name, reason);
        answer::error(task, entry, reason, message)
    }
}

impl Routing {
    /// The routing for `config` served by `engine`, with the entities
    /// injected at run time in the tasks (as the engine has them), so an
    /// escalation's schema offers the same enum values.
    pub fn for_config(engine: Engine, config: &crate::config::Config) -> Routing {
        let injected = injection::Injected::load(&config.state_dir())
            .map(|i| i.apply(config))
            .unwrap_or_else(|e| {
                log::error!("routing without injected entities: {e}");
                config.clone()
            });
        Routing::new(engine, injected.tasks, config.limits.clone())
    }

    pub fn new(engine: Engine, tasks: Vec<TaskConfig>, limits: Limits) -> Routing {
        Routing {
            monitors: Monitors::new(tasks.iter().map(|t| (t.name.as_str(), t.monitor()))),
            escalators: tasks
                .iter()
                .filter_map(|t| Some((t.name.clone(), Escalator::new(t)?)))
                .collect(),
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

/// The id a message is deduplicated by, and for how long. An id-less
/// copy the broker does not call a redelivery may be the user repeating
/// themselves: only a short window applies to it.
fn dedup_identity(entry: &InboxEntry, limits: &Limits) -> (String, u64) {
    let own_id = match &entry.truncated {
        Some(t) => Some(t.id.clone()),
        None => payload::own_id(&entry.payload),
    };
    let window_secs = if own_id.is_some() || entry.dup {
        limits.dedup_window_secs
    } else {
        limits.content_dedup_window_secs
    };
    let id = own_id.unwrap_or_else(|| payload::derived_id(&entry.topic, &entry.payload));
    (id, window_secs)
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

#[cfg(test)]
mod tests;
