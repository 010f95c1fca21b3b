//! What goes over the wire: input payloads in, result and error JSON out.
//!
//! Input is either JSON `{"id": "...", "text": "...", "context": {...}}` or
//! plain UTF-8 text; for a Hermes task, a query `{"input": "...", ...}`
//! ([`crate::hermes`]), whose `siteId` is the context's `area`.
//! Anything else gets an [`InputError`] with a machine-readable `reason`,
//! published as an error result; the daemon never stops on bad input.

use serde::Serialize;

use crate::config::{Limits, Protocol};
use std::collections::BTreeMap;

use slmd_engine::schema::{SlotValue, Span};
use slmd_engine::{ModelInfo, Query, Scores};

/// A message ready for inference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub text: String,
    /// A Hermes query's session (site, session id, intent filter).
    pub session: Option<crate::hermes::Session>,
    /// Slot values the sender's situation gives (see [`slmd_engine::context`]).
    pub context: BTreeMap<String, String>,
}

impl Request {
    /// What the engine is asked: the text, the intents a Hermes query
    /// allows, and the context.
    pub fn query(&self) -> Query {
        Query {
            text: self.text.clone(),
            among: self.session.as_ref().and_then(|s| s.intent_filter.clone()),
            context: self.context.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("payload is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid UTF-8 (first bad byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("payload looks like JSON but does not parse: {0}")]
    InvalidJson(String),
    #[error("JSON payload has no string field \"{0}\"")]
    MissingText(&'static str),
    #[error("text is empty")]
    EmptyText,
    #[error("intentFilter must be null or a list of intent names")]
    BadIntentFilter,
    #[error("context must be an object of strings (slot name to value)")]
    BadContext,
    #[error("text is {chars} characters; the limit is {limit}")]
    TextTooLong { chars: usize, limit: usize },
}

impl InputError {
    /// Stable, machine-readable reason for the error result.
    pub fn reason(&self) -> &'static str {
        match self {
            InputError::TooLarge { .. } => "too_large",
            InputError::NotUtf8 { .. } => "not_utf8",
            InputError::InvalidJson(_) => "invalid_json",
            InputError::MissingText(_) => "missing_text",
            InputError::EmptyText => "empty_text",
            InputError::BadIntentFilter => "bad_intent_filter",
            InputError::BadContext => "bad_context",
            InputError::TextTooLong { .. } => "text_too_long",
        }
    }
}

pub use slmd_core::ids::{derived_id, id_of, json_id, own_id};

pub fn parse(
    protocol: Protocol,
    topic: &str,
    payload: &[u8],
    limits: &Limits,
) -> Result<Request, InputError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(InputError::TooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let body = std::str::from_utf8(payload).map_err(|e| InputError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let json = body.trim_start().starts_with('{');
    let (id, text, session, context) = if json || protocol == Protocol::Hermes {
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| InputError::InvalidJson(e.to_string()))?;
        let field = match protocol {
            Protocol::Slmd => "text",
            Protocol::Hermes => "input",
        };
        let text = v
            .get(field)
            .and_then(|t| t.as_str())
            .ok_or(InputError::MissingText(field))?;
        let id = json_id(&v).unwrap_or_else(|| derived_id(topic, payload));
        let (session, context) = match protocol {
            Protocol::Slmd => (None, context_of(&v)?),
            Protocol::Hermes => {
                let session = crate::hermes::Session::of(&v).ok_or(InputError::BadIntentFilter)?;
                let context = session.area().map(|a| ("area".to_owned(), a));
                (Some(session), context.into_iter().collect())
            }
        };
        (id, text.to_owned(), session, context)
    } else {
        (
            derived_id(topic, payload),
            body.to_owned(),
            None,
            BTreeMap::new(),
        )
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(InputError::EmptyText);
    }
    let chars = text.chars().count();
    if chars > limits.max_text_chars {
        return Err(InputError::TextTooLong {
            chars,
            limit: limits.max_text_chars,
        });
    }
    Ok(Request {
        id,
        text: text.to_owned(),
        session,
        context,
    })
}

/// A JSON request's `context`: absent or an object of strings.
fn context_of(v: &serde_json::Value) -> Result<BTreeMap<String, String>, InputError> {
    match v.get("context") {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(members)) => members
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<_>>()
            .ok_or(InputError::BadContext),
        Some(_) => Err(InputError::BadContext),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Alternative {
    pub label: String,
    pub confidence: f32,
}

/// A task's result, as published: the label of a classify task, or the
/// intent and slots of an extract task, with confidence and alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub id: String,
    pub task: String,
    /// False when the best label's confidence is below the task's
    /// `abstain_below`, or the best label is its reject label.
    pub recognised: bool,
    /// Why not, when not recognised: `low_confidence`, `reject_label`,
    /// `unlike_examples`, `filtered`, `no_template_match`, `upstream`,
    /// `upstream_unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_recognised: Option<slmd_engine::Unrecognised>,
    #[serde(flatten)]
    pub answer: Answer,
    /// Calibrated probability of the best label among the task's labels.
    pub confidence: f32,
    /// The best labels after `label` (or, when not recognised, the best
    /// labels), most probable first, at most three.
    pub alternatives: Vec<Alternative>,
    pub model: ModelInfo,
    /// From the message being stored to its result being ready.
    pub latency_ms: f64,
    /// Of that, time on the inference thread (or in the template stage).
    pub inference_ms: f64,
    /// The stage that answered: `template`, `model` or `escalated`.
    pub by: slmd_engine::Stage,
    /// What the task's safety policy says to do (tasks with a policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<crate::policy::Action>,
    /// When the answer was doubtful and went upstream: who, what came of
    /// it, and the local guess.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<crate::escalate::Report>,
}

/// What the task found.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Classify {
        /// The recognised label; null when not recognised.
        label: Option<String>,
    },
    Extract {
        /// The recognised intent; null when not recognised.
        intent: Option<String>,
        /// Slot name to value (string or number); empty when not recognised.
        slots: BTreeMap<String, SlotValue>,
        /// Slot name to where its value was said in the text (byte offsets,
        /// end exclusive, and the raw text); slots whose value is not in
        /// the text have none.
        spans: BTreeMap<String, Span>,
    },
}

impl Answer {
    fn new(scores: &Scores) -> Answer {
        match &scores.slots {
            None => Answer::Classify {
                label: scores.label.clone(),
            },
            Some(slots) => Answer::Extract {
                intent: scores.label.clone(),
                slots: slots
                    .iter()
                    .map(|s| (s.name.clone(), s.value.clone()))
                    .collect(),
                spans: slots
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), s.span.clone()?)))
                    .collect(),
            },
        }
    }
}

impl TaskResult {
    pub fn new(
        id: String,
        task: &str,
        scores: &Scores,
        model: &ModelInfo,
        latency_ms: f64,
    ) -> TaskResult {
        let skip = usize::from(scores.label.is_some());
        TaskResult {
            id,
            task: task.to_owned(),
            recognised: scores.label.is_some(),
            not_recognised: scores
                .label
                .is_none()
                .then_some(scores.unrecognised)
                .flatten(),
            answer: Answer::new(scores),
            confidence: scores.ranked.first().map_or(0.0, |r| round4(r.1) as f32),
            alternatives: scores.ranked[skip.min(scores.ranked.len())..]
                .iter()
                .take(3)
                .map(|(l, p)| Alternative {
                    label: l.clone(),
                    confidence: round4(*p) as f32,
                })
                .collect(),
            model: model.clone(),
            latency_ms: round2(latency_ms),
            inference_ms: round2(scores.inference_ms),
            by: scores.by,
            action: None,
            escalation: None,
        }
    }
}

/// An error result, as published on the task's error topic.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorResult {
    pub id: String,
    pub task: String,
    pub topic: String,
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// Machine-readable: `too_large`, `not_utf8`, `invalid_json`,
    /// `missing_text`, `empty_text`, `text_too_long`, `bad_intent_filter` (Hermes), `inference_failed`;
    /// on the dead-letter topic, `too_many_attempts`.
    pub reason: String,
    pub message: String,
}

/// A message given up on, as published on `limits.dead_letter_topic`: the
/// original comes along so an operator can inspect or re-send it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub task: String,
    pub topic: String,
    pub attempts: u32,
    pub error: ErrorBody,
    /// The original payload when it is UTF-8 text, else `payload_hex`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
}

impl DeadLetter {
    pub fn new(task: &str, topic: &str, payload: &[u8], attempts: u32) -> DeadLetter {
        let text = std::str::from_utf8(payload).ok().map(str::to_owned);
        DeadLetter {
            id: id_of(topic, payload),
            task: task.to_owned(),
            topic: topic.to_owned(),
            attempts,
            error: ErrorBody {
                reason: "too_many_attempts".into(),
                message: format!(
                    "processing was interrupted {attempts} time(s) (the daemon crashed or was \
                     killed while it ran); given up"
                ),
            },
            payload_hex: text.is_none().then(|| hex::encode(payload)),
            payload: text,
        }
    }
}

/// A confidence as answers print it: four decimals, as the `f64` nearest
/// to them (JSON shows it as written; an `f32` field shows the same).
pub(crate) fn round4(x: f32) -> f64 {
    (f64::from(x) * 10000.0).round() / 10000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// An outbox entry carrying `value` as JSON.
pub fn json_entry(topic: &str, value: &impl Serialize) -> slmd_store::OutboxEntry {
    slmd_store::OutboxEntry {
        topic: topic.to_owned(),
        correlation: None,
        payload: serde_json::to_vec(value).expect("results always serialise"),
        retain: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLMD: Protocol = Protocol::Slmd;

    #[test]
    fn a_json_context_is_an_object_of_strings() {
        let p = br#"{"text": "skip", "context": {"area": "Living Room"}}"#;
        let q = parse(SLMD, "t", p, &limits()).unwrap().query();
        assert_eq!((q.text.as_str(), q.among), ("skip", None));
        assert_eq!(
            q.context.get("area").map(String::as_str),
            Some("Living Room")
        );
        for bad in [
            &br#"{"text": "skip", "context": "Living Room"}"#[..],
            br#"{"text": "skip", "context": {"area": 3}}"#,
        ] {
            assert_eq!(
                parse(SLMD, "t", bad, &limits()).unwrap_err().reason(),
                "bad_context"
            );
        }
        let default_site = br#"{"input": "skip", "siteId": "default"}"#;
        let r = parse(Protocol::Hermes, "t", default_site, &limits()).unwrap();
        assert!(r.context.is_empty(), "Hermes' placeholder site is no area");
    }

    #[test]
    fn a_hermes_query_is_json_with_its_input_and_session() {
        let q = br#"{"input": " lights on ", "id": "q1", "siteId": "hall", "intentFilter": ["A"]}"#;
        let roomy = Limits {
            max_payload_bytes: 256,
            ..limits()
        };
        let r = parse(Protocol::Hermes, "hermes/nlu/query", q, &roomy).unwrap();
        assert_eq!((r.id.as_str(), r.text.as_str()), ("q1", "lights on"));
        assert_eq!(r.query().among, Some(vec!["A".into()]));
        assert_eq!(r.context.get("area").map(String::as_str), Some("hall"));
        let s = r.session.unwrap();
        assert_eq!(
            (s.site_id.as_str(), s.intent_filter),
            ("hall", Some(vec!["A".into()]))
        );
        let reason = |p: &[u8]| {
            parse(Protocol::Hermes, "t", p, &limits())
                .unwrap_err()
                .reason()
        };
        assert_eq!(
            reason(b"lights on"),
            "invalid_json",
            "Hermes has no plain-text form"
        );
        assert_eq!(reason(br#"{"text": "lights on"}"#), "missing_text");
        assert_eq!(
            reason(br#"{"input": "x", "intentFilter": "A"}"#),
            "bad_intent_filter"
        );
        assert_eq!(
            reason(br#"{"input": "x", "intentFilter": [1]}"#),
            "bad_intent_filter"
        );
        let e = parse(Protocol::Hermes, "t", br#"{"text": "x"}"#, &limits()).unwrap_err();
        assert!(e.to_string().contains("\"input\""), "{e}");
    }

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 64,
            max_text_chars: 20,
            max_in_flight: 4,
            ..Limits::default()
        }
    }

    #[test]
    fn json_and_plain_text_are_accepted() {
        let r = parse(
            SLMD,
            "t",
            br#"{"id": "a1", "text": " lights off "}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            r,
            Request {
                id: "a1".into(),
                text: "lights off".into(),
                session: None,
                context: BTreeMap::new(),
            }
        );
        let r = parse(SLMD, "t", br#"{"id": 7, "text": "x"}"#, &limits()).unwrap();
        assert_eq!(r.id, "7");
        let r = parse(SLMD, "t", b"lights off", &limits()).unwrap();
        assert_eq!(r.text, "lights off");
        assert_eq!(r.id, derived_id("t", b"lights off"));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_id("a", b"x"), derived_id("a", b"x"));
        assert_ne!(derived_id("a", b"x"), derived_id("b", b"x"));
        assert_ne!(derived_id("a/", b"x"), derived_id("a", b"/x"));
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        let l = limits();
        let reason = |p: &[u8]| parse(SLMD, "t", p, &l).unwrap_err().reason();
        assert_eq!(reason(&[b'a'; 65]), "too_large");
        assert_eq!(reason(&[0xff, 0xfe, b'a']), "not_utf8");
        assert_eq!(reason(b"{\"text\": "), "invalid_json");
        assert_eq!(reason(br#"{"id": "x"}"#), "missing_text");
        assert_eq!(reason(br#"{"text": 5}"#), "missing_text");
        assert_eq!(reason(b"   "), "empty_text");
        assert_eq!(reason(br#"{"text": ""}"#), "empty_text");
        assert_eq!(reason("a".repeat(21).as_bytes()), "text_too_long");
    }

    #[test]
    fn id_is_reported_even_for_bad_payloads() {
        assert_eq!(id_of("t", br#"{"id": "z"}"#), "z");
        assert_eq!(id_of("t", &[0xff]), derived_id("t", &[0xff]));
    }
}
