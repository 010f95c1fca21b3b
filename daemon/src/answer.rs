//! What goes out for a message, in its task's protocol: a JSON result
//! (with the policy's action when the task has a policy) or a Hermes
//! intent, and errors shaped the same way.

use crate::config::{Protocol, TaskConfig};
use crate::hermes;
use crate::payload::{self, json_entry, ErrorBody, ErrorResult, Request, TaskResult};
use crate::policy;
use slmd_engine::{ModelInfo, Scores};
use slmd_store::{InboxEntry, OutboxEntry};

/// A task's answer to one message.
pub struct Answer {
    pub out: OutboxEntry,
    /// A Hermes task's `hermes/nlu/intentParsed` copy, when it asks for one.
    pub announce: Option<OutboxEntry>,
    /// The confidence reported (the top label's probability).
    pub confidence: f32,
    pub latency_ms: f64,
}

/// The answer of `task` to `req`, scored `scores` by `model` (and sent
/// upstream, when `escalation` says so); `speed` is the vehicle's for a
/// task with a policy. Its latency runs from `entry` being stored to now.
pub fn result(
    task: &TaskConfig,
    entry: &InboxEntry,
    req: &Request,
    scores: &Scores,
    escalation: Option<&crate::escalate::Report>,
    model: &ModelInfo,
    speed: Option<f64>,
) -> Answer {
    let latency_ms = slmd_core::now_ms().saturating_sub(entry.received_ms) as f64;
    let mut result = TaskResult::new(req.id.clone(), &task.name, scores, model, latency_ms);
    result.escalation = escalation.cloned();
    let (confidence, latency_ms) = (result.confidence, result.latency_ms);
    let Some(session) = &req.session else {
        // Hermes answers carry no action; only JSON results decide one.
        result.action = task.policy.as_ref().map(|p| {
            p.decide(&policy::Command {
                topic: &entry.topic,
                text: &req.text,
                intent: scores.label.as_deref(),
                confidence,
                slots: scores.slots.as_deref().unwrap_or_default(),
                speed_kmh: speed,
                escalated: scores.by == slmd_engine::Stage::Escalated,
            })
        });
        return Answer {
            out: json_entry(&task.output_topic, &result),
            announce: None,
            confidence,
            latency_ms,
        };
    };
    let (topic, mut body) = hermes::answer(&task.output_topic, session, &req.text, scores);
    if let Some(e) = escalation {
        // Hermes clients ignore keys they do not know.
        body["escalation"] = serde_json::json!(e);
    }
    let announce = task
        .hermes_intent_parsed
        .then(|| hermes::parsed(&body).map(|(t, b)| json_entry(&t, &b)))
        .flatten();
    Answer {
        out: json_entry(&topic, &body),
        announce,
        confidence,
        latency_ms,
    }
}

/// An error result for a message `task` cannot answer, logged.
pub fn error(task: &TaskConfig, entry: &InboxEntry, reason: &str, message: String) -> OutboxEntry {
    let id = message_id(entry);
    log::warn!(
        task = task.name.as_str(),
        msg_id = id.as_str(),
        topic = entry.topic.as_str(),
        reason = reason;
        "rejected: {message}"
    );
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

/// The id to report for a message, even one that fails to parse or was
/// cut (its id was taken from the whole payload).
pub fn message_id(entry: &InboxEntry) -> String {
    match &entry.truncated {
        Some(t) => t.id.clone(),
        None => payload::id_of(&entry.topic, &entry.payload),
    }
}
