//! Escalation: a task's doubtful answers go to a larger model, the
//! routine ones stay on the device.
//!
//! A model answer below `[tasks.escalate] below` (or not recognised) is
//! sent upstream with the task's labels and slot schema:
//!
//! - over MQTT (`topic`): a request `{correlation_id, reply_topic, task,
//!   text, context, labels, schema, local, deadline_ms}` goes out through
//!   the outbox (stored and forwarded like a result); the first answer on
//!   `reply_topic` with that `correlation_id` that fits the schema is the
//!   result;
//! - over HTTP (`url`): an OpenAI-compatible chat completion constrained
//!   by the schema ([`http`]).
//!
//! Every answer passes [`shape::Shape::check`]; one outside the labels or
//! schema is refused, never published. While the request is pending the
//! message stays in the inbox (not blamed if the daemon dies: the local
//! inference is over), so a crash asks again on restart with the same
//! correlation id and the result is still published once. An upstream that
//! is unreachable, busy, refused or silent past the deadline (`wait_secs`
//! after the message arrived, at least one `timeout_ms`) leaves the task's
//! `on_unavailable` choice: the local answer, or not recognised. The result
//! says `"by": "escalated"` when the upstream answered, and always carries
//! an `escalation` report with the local guess.

pub mod http;
pub mod shape;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::config::{TaskConfig, TaskKind};
use shape::{Shape, Verdict};
use slmd_core::now_ms;
use slmd_engine::schema::SlotValue;
use slmd_engine::Scores;

/// `[tasks.escalate]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalateConfig {
    /// The upstream's name in results (`escalation.upstream`).
    pub name: String,
    /// A model answer less confident than this is escalated.
    #[serde(default = "default_below")]
    pub below: f32,
    /// Whether a "not recognised" (abstained, rejected, out of scope) is
    /// escalated too.
    #[serde(default = "yes")]
    pub not_recognised: bool,
    /// MQTT: where requests are published.
    pub topic: Option<String>,
    /// MQTT: where answers arrive (slmd subscribes to it).
    pub reply_topic: Option<String>,
    /// HTTP: an OpenAI-compatible base URL (`.../v1`).
    pub url: Option<String>,
    /// HTTP: the model name sent.
    #[serde(default = "default_model")]
    pub model: String,
    /// HTTP: a file holding the bearer token (relative to the configuration
    /// file); read at every call, so it can be rotated.
    pub api_key_file: Option<PathBuf>,
    /// HTTP: how the schema is sent.
    #[serde(default)]
    pub response_format: ResponseFormat,
    /// One call's limit (HTTP), or the least time an answer is awaited.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests outstanding at once; more wait (up to the deadline).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// How long after a message arrived slmd keeps trying an upstream that
    /// is unreachable or failing (0: one try).
    #[serde(default)]
    pub wait_secs: u64,
    /// What is published when the upstream gives no valid answer in time.
    #[serde(default)]
    pub on_unavailable: Fallback,
}

/// How an HTTP request carries the schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// OpenAI's `{"type": "json_schema", "json_schema": {"schema": ...}}`
    /// (llama.cpp's server, Ollama, vLLM, OpenAI).
    #[default]
    JsonSchema,
    /// `{"type": "json_object", "schema": ...}` (llama-cpp-python).
    JsonObject,
}

/// The result when escalation gives no answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The local answer, marked as such.
    #[default]
    Local,
    /// Not recognised (the local guess stays in the report).
    NotRecognised,
}

fn default_below() -> f32 {
    0.5
}
fn yes() -> bool {
    true
}
fn default_model() -> String {
    "default".into()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent() -> usize {
    2
}

impl EscalateConfig {
    /// What is wrong with it, as `(key, why)` pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        match (&self.topic, &self.reply_topic, &self.url) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (Some(_), None, None) => p.push(("reply_topic", "is needed with topic".into())),
            (None, Some(_), None) => p.push(("topic", "is needed with reply_topic".into())),
            _ => p.push(("url", "set either url or topic and reply_topic".into())),
        }
        for (key, t) in [("topic", &self.topic), ("reply_topic", &self.reply_topic)] {
            if let Some(Err(why)) = t.as_deref().map(slmd_core::topic::check_name) {
                p.push((key, why.to_string()));
            }
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                p.push(("url", format!("{url:?} is not an http(s) URL")));
            }
        }
        if !(0.0..=1.0).contains(&self.below) {
            p.push(("below", "must be between 0 and 1".into()));
        }
        if self.max_concurrent == 0 {
            p.push(("max_concurrent", "must be at least 1".into()));
        }
        if self.timeout_ms == 0 {
            p.push(("timeout_ms", "must be at least 1".into()));
        }
        if self.wait_secs > 7 * 24 * 3600 {
            p.push(("wait_secs", "must be at most a week (604800)".into()));
        }
        if let Some(key) = &self.api_key_file {
            if !key.is_file() {
                p.push((
                    "api_key_file",
                    format!("{} is not a readable file", key.display()),
                ));
            }
        }
        p
    }
}

/// A task's escalation, built with its routing.
pub struct Escalator {
    pub config: EscalateConfig,
    shape: Shape,
    instruction: String,
    permits: Semaphore,
}

/// What the upstream made of a request.
#[derive(Debug)]
pub enum Outcome {
    Answered(Verdict),
    /// It answered, but outside the labels or schema.
    Refused(Why),
    /// No answer in time.
    Unavailable(Why),
}

/// Why an escalation gave no answer: a fixed code for the published result
/// (it reaches everyone who reads the output topic) and the details, which
/// may name the URL or quote the upstream, for the log only.
#[derive(Debug)]
pub struct Why {
    pub code: String,
    pub detail: String,
}

impl Why {
    fn new(code: impl Into<String>, detail: impl std::fmt::Display) -> Why {
        Why {
            code: code.into(),
            detail: detail.to_string(),
        }
    }
}

/// One escalation, as the result reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub upstream: String,
    /// `answered`, `refused` or `unavailable`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What slmd made of the input itself.
    pub local: LocalGuess,
}

#[derive(Debug, Clone, Serialize)]
pub struct LocalGuess {
    pub label: Option<String>,
    pub confidence: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<BTreeMap<String, SlotValue>>,
}

impl LocalGuess {
    fn of(scores: &Scores) -> LocalGuess {
        LocalGuess {
            label: scores.label.clone(),
            confidence: scores.ranked.first().map_or(0.0, |r| r.1),
            slots: scores.slots.as_ref().map(|s| {
                s.iter()
                    .map(|s| (s.name.clone(), s.value.clone()))
                    .collect()
            }),
        }
    }
}

/// One message's escalation.
pub struct Ask<'a> {
    /// The same for the same message across restarts.
    pub correlation: String,
    pub task: &'a str,
    pub text: &'a str,
    pub context: &'a BTreeMap<String, String>,
    /// A Hermes `intentFilter`.
    pub among: Option<&'a [String]>,
    pub local: &'a Scores,
    /// When the message was stored (ms since the epoch).
    pub received_ms: u64,
}

/// Where MQTT requests go out: the store's outbox, and the publisher's
/// wake-up.
pub struct Outbox<'a> {
    pub store: &'a slmd_store::Store,
    pub wake: &'a (dyn Fn() + Send + Sync),
}

impl Escalator {
    /// `task`'s escalation, if it has one.
    pub fn new(task: &TaskConfig) -> Option<Arc<Escalator>> {
        let config = task.escalate.clone()?;
        let slots = match &task.kind {
            TaskKind::Extract(e) => Some(e.slots.clone()),
            _ => None,
        };
        let label_slots = task
            .labels
            .iter()
            .filter_map(|l| Some((l.name.clone(), l.slots.clone()?)))
            .collect();
        Some(Arc::new(Escalator {
            permits: Semaphore::new(config.max_concurrent),
            shape: Shape {
                // The reject label is no answer: null says "none fits".
                labels: task
                    .labels
                    .iter()
                    .map(|l| l.name.clone())
                    .filter(|l| task.reject_label.as_ref() != Some(l))
                    .collect(),
                slots,
                label_slots,
            },
            instruction: task.instruction.clone(),
            config,
        }))
    }

    /// Whether a local answer goes upstream. A template match never does:
    /// it is certain by construction.
    pub fn wanted(&self, scores: &Scores) -> bool {
        if scores.by == slmd_engine::Stage::Template {
            return false;
        }
        let confidence = scores.ranked.first().map_or(0.0, |r| r.1);
        match (scores.label.as_ref(), scores.unrecognised) {
            // A Hermes intentFilter allowed none of the labels: nothing to ask.
            (None, Some(slmd_engine::Unrecognised::Filtered)) => false,
            (None, _) => self.config.not_recognised,
            (Some(_), _) => confidence < self.config.below,
        }
    }

    /// Asks the upstream; returns what to publish and the report.
    pub async fn resolve(
        &self,
        ask: &Ask<'_>,
        pending: &Pending,
        outbox: &Outbox<'_>,
    ) -> (Scores, Report) {
        let started = Instant::now();
        let outcome = self.ask(ask, pending, outbox).await;
        let local = LocalGuess::of(ask.local);
        let report = |outcome, reason| Report {
            upstream: self.config.name.clone(),
            outcome,
            reason,
            local: local.clone(),
        };
        let waited = started.elapsed().as_millis();
        let (scores, report) = match outcome {
            Outcome::Answered(v) => {
                log::info!(
                    task = ask.task,
                    upstream = self.config.name.as_str(),
                    label = v.label.as_deref().unwrap_or("-"),
                    waited_ms = waited;
                    "escalated: answered"
                );
                (answered(ask.local, v), report("answered", None))
            }
            Outcome::Refused(why) => {
                log::warn!(task = ask.task, upstream = self.config.name.as_str(), reason = why.code.as_str(); "escalation refused: {}", why.detail);
                (self.fallback(ask.local), report("refused", Some(why.code)))
            }
            Outcome::Unavailable(why) => {
                log::warn!(task = ask.task, upstream = self.config.name.as_str(), reason = why.code.as_str(); "escalation unavailable: {}", why.detail);
                (
                    self.fallback(ask.local),
                    report("unavailable", Some(why.code)),
                )
            }
        };
        (scores, report)
    }

    fn fallback(&self, local: &Scores) -> Scores {
        let mut s = local.clone();
        if self.config.on_unavailable == Fallback::NotRecognised && s.label.is_some() {
            s.label = None;
            s.unrecognised = Some(slmd_engine::Unrecognised::UpstreamUnavailable);
            if let Some(slots) = &mut s.slots {
                slots.clear();
            }
        }
        s
    }

    /// The deadline of `ask`: `wait_secs` after the message arrived, and
    /// at least one timeout from now.
    fn deadline(&self, ask: &Ask<'_>) -> Instant {
        let wait = self.config.wait_secs * 1000;
        // The wall clock may have jumped (a device without a clock that
        // synchronised late): never more than `wait_secs` from now.
        let left = (ask.received_ms + wait).saturating_sub(now_ms()).min(wait);
        Instant::now() + Duration::from_millis(left.max(self.config.timeout_ms))
    }

    async fn ask(&self, ask: &Ask<'_>, pending: &Pending, outbox: &Outbox<'_>) -> Outcome {
        let deadline = self.deadline(ask);
        let shape = self.shape.narrowed(ask.among);
        let Ok(permit) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
            return Outcome::Unavailable(Why::new(
                "busy",
                format!(
                    "all {} request slot(s) stayed busy until the deadline",
                    self.config.max_concurrent
                ),
            ));
        };
        let _permit = permit.expect("never closed");
        match (&self.config.url, &self.config.reply_topic) {
            (Some(url), _) => self.over_http(url, ask, &shape, deadline).await,
            // Validation makes topic and reply_topic go together.
            (None, reply) => {
                let request = OverMqtt {
                    topic: self.config.topic.as_deref().unwrap_or_default(),
                    reply: reply.as_deref().unwrap_or_default(),
                    shape: &shape,
                    deadline,
                };
                request.run(ask, pending, outbox).await
            }
        }
    }

    async fn over_http(
        &self,
        url: &str,
        ask: &Ask<'_>,
        shape: &Shape,
        deadline: Instant,
    ) -> Outcome {
        let system = format!(
            "{}\nAnswer with JSON only, in the given schema. Use null when none of these fits: {}.",
            self.instruction,
            shape.labels.join(", ")
        );
        let schema = shape.json_schema();
        let mut backoff = Duration::from_millis(500);
        loop {
            let timeout = Duration::from_millis(self.config.timeout_ms)
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1));
            let call = http::Call {
                url: url.to_owned(),
                model: self.config.model.clone(),
                key_file: self.config.api_key_file.clone(),
                format: self.config.response_format,
                timeout,
                system: system.clone(),
                user: ask.text.to_owned(),
                schema: schema.clone(),
            };
            let call = tokio::task::spawn_blocking(move || http::complete(&call));
            let Ok(call) = tokio::time::timeout_at(deadline, call).await else {
                // A call stuck past its own timeout (a name lookup, say).
                return Outcome::Unavailable(Why::new(
                    "timeout",
                    "the call outlasted the deadline",
                ));
            };
            let why = match call {
                Ok(Ok(answer)) => {
                    return match shape.check(&answer, ask.text) {
                        Ok(v) => Outcome::Answered(v),
                        Err(e) => Outcome::Refused(Why::new(e.code(), e)),
                    }
                }
                Ok(Err(e)) if !e.retryable() => {
                    return match e {
                        http::HttpError::NotACompletion(_) => {
                            Outcome::Refused(Why::new(e.code(), e))
                        }
                        e => Outcome::Unavailable(Why::new(e.code(), e)),
                    }
                }
                Ok(Err(e)) => Why::new(e.code(), e),
                Err(e) => return Outcome::Unavailable(Why::new("failed", e)),
            };
            if Instant::now() + backoff >= deadline {
                return Outcome::Unavailable(why);
            }
            log::debug!(
                "escalation to {url}: {}; trying again in {backoff:?}",
                why.detail
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// An MQTT escalation in progress.
struct OverMqtt<'a> {
    topic: &'a str,
    reply: &'a str,
    shape: &'a Shape,
    deadline: Instant,
}

impl OverMqtt<'_> {
    async fn run(&self, ask: &Ask<'_>, pending: &Pending, outbox: &Outbox<'_>) -> Outcome {
        let mut answers = pending.open(&ask.correlation);
        let deadline_ms = now_ms()
            + self
                .deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64;
        let local = ask.local;
        let request = json!({
            "correlation_id": ask.correlation,
            "reply_topic": self.reply,
            "task": ask.task,
            "text": ask.text,
            "context": ask.context,
            "labels": self.shape.labels,
            "schema": self.shape.json_schema(),
            "local": LocalGuess::of(local),
            "alternatives": local.ranked.iter().take(3).map(|(l, p)| json!({"label": l, "confidence": p})).collect::<Vec<_>>(),
            "deadline_ms": deadline_ms,
        });
        let entry = slmd_store::OutboxEntry {
            topic: self.topic.to_owned(),
            correlation: Some(ask.correlation.as_bytes().to_vec()),
            payload: request.to_string().into_bytes(),
            retain: false,
        };
        if let Err(e) = outbox.store.publish(&entry) {
            return Outcome::Unavailable(Why::new(
                "not_queued",
                format!("cannot queue the request: {e}"),
            ));
        }
        (outbox.wake)();
        let mut refused = None;
        loop {
            match tokio::time::timeout_at(self.deadline, answers.rx.recv()).await {
                Ok(Some(payload)) => {
                    let checked = serde_json::from_slice::<Value>(&payload)
                        .map_err(|e| Why::new("not_json", e))
                        .and_then(|v| {
                            let checked = self.shape.check(&v, ask.text);
                            checked.map_err(|e| Why::new(e.code(), e))
                        });
                    match checked {
                        Ok(v) => return Outcome::Answered(v),
                        Err(why) => {
                            log::warn!(task = ask.task; "an answer on {} was refused: {}", self.reply, why.detail);
                            refused = Some(why);
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    return match refused {
                        Some(why) => Outcome::Refused(why),
                        None => Outcome::Unavailable(Why::new(
                            "no_answer",
                            format!("no answer on {} before the deadline", self.reply),
                        )),
                    }
                }
            }
        }
    }
}

/// MQTT escalations waiting for answers, by correlation id. Shared by all
/// routings, so a reload does not lose them.
#[derive(Default)]
pub struct Pending(Mutex<HashMap<String, mpsc::Sender<Vec<u8>>>>);

/// Answers to one request; unregisters itself when dropped.
pub struct Answers<'a> {
    pending: &'a Pending,
    correlation: String,
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        let mut map = self.pending.0.lock().unwrap();
        // Only its own: a request that took the id over keeps its entry.
        let own = map
            .get(&self.correlation)
            .is_some_and(|tx| tx.same_channel(&self.tx));
        if own {
            map.remove(&self.correlation);
        }
    }
}

impl Pending {
    fn open(&self, correlation: &str) -> Answers<'_> {
        let (tx, rx) = mpsc::channel(4);
        self.0
            .lock()
            .unwrap()
            .insert(correlation.to_owned(), tx.clone());
        Answers {
            pending: self,
            correlation: correlation.to_owned(),
            tx,
            rx,
        }
    }

    /// Hands an answer from a reply topic to its request; false when no
    /// request waits for it (late, or for another device).
    pub fn deliver(&self, payload: &[u8]) -> bool {
        let correlation = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("correlation_id")?.as_str().map(str::to_owned));
        let Some(c) = correlation else {
            return false;
        };
        let tx = self.0.lock().unwrap().get(&c).cloned();
        tx.is_some_and(|tx| tx.try_send(payload.to_vec()).is_ok())
    }
}

/// The local scores with the upstream's answer in front: its label first
/// (stated as certain: the upstream chose it within the schema), the
/// local labels after it.
fn answered(local: &Scores, v: Verdict) -> Scores {
    let mut ranked: Vec<(String, f32)> = Vec::with_capacity(local.ranked.len() + 1);
    if let Some(l) = &v.label {
        ranked.push((l.clone(), 1.0));
    }
    ranked.extend(
        local
            .ranked
            .iter()
            .filter(|(l, _)| Some(l) != v.label.as_ref())
            .cloned(),
    );
    Scores {
        ranked,
        unrecognised: v
            .label
            .is_none()
            .then_some(slmd_engine::Unrecognised::Upstream),
        label: v.label,
        slots: v.slots,
        by: slmd_engine::Stage::Escalated,
        ..local.clone()
    }
}

#[cfg(test)]
mod tests;
