//! The Hermes protocol of Snips and Rhasspy, so slmd can be their NLU
//! service without changing anything else in the setup.
//!
//! A task with `protocol = "hermes"` (usually `topics =
//! ["hermes/nlu/query"]`, `output_topic = "hermes/intent"`) reads queries
//!
//! ```json
//! {"input": "turn on the kitchen lights", "id": "q1", "siteId": "kitchen",
//!  "sessionId": "s1", "intentFilter": ["HassTurnOn", "HassTurnOff"]}
//! ```
//!
//! and answers on one of three topics, echoing `id`, `siteId`, `sessionId`
//! and `customData`:
//!
//! - `<output_topic>/<intentName>`: `input`, `intent` (`intentName`,
//!   `confidenceScore`), `slots` (`entity`, `slotName`, `rawValue`, `value`
//!   as `{"kind", "value"}`, `range` in characters of `input`),
//!   `alternatives`;
//! - `hermes/nlu/intentNotRecognized` below the task's threshold (or for
//!   the reject label): `input` and the `alternatives`;
//! - `hermes/error/nlu` for a query that cannot be read or inferred:
//!   `error` (the message) and `context` (slmd's reason code).
//!
//! `intentFilter` restricts the intents chosen among (see
//! [`crate::engine::Engine::infer_among`]). Entity injection
//! (`hermes/injection/perform`) is in [`crate::injection`].

use serde_json::{json, Value};

use crate::engine::schema::{Slot, SlotValue};
use crate::engine::Scores;

pub const NOT_RECOGNIZED_TOPIC: &str = "hermes/nlu/intentNotRecognized";
pub const ERROR_TOPIC: &str = "hermes/error/nlu";

/// What a query brings besides its input; echoed in every answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The query's own `id` (Hermes allows null).
    pub id: Option<String>,
    pub site_id: String,
    pub session_id: Option<String>,
    /// Opaque to the NLU; returned as it came.
    pub custom_data: Value,
    /// `intentFilter`: only these intents may be recognised.
    pub intent_filter: Option<Vec<String>>,
}

impl Session {
    /// From a query object; missing or mistyped fields take Hermes'
    /// defaults (`siteId` "default", no session), but an `intentFilter`
    /// that is not null or a list of names gives `None`: a filter must
    /// never silently widen to every intent.
    pub fn of(query: &Value) -> Option<Session> {
        let filter = match query.get("intentFilter") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()?,
            ),
            Some(_) => return None,
        };
        Some(Session {
            intent_filter: filter,
            ..Session::echoed(query)
        })
    }

    /// The fields an answer echoes, without the filter.
    fn echoed(query: &Value) -> Session {
        let text = |k: &str| query.get(k).and_then(Value::as_str).map(str::to_owned);
        Session {
            id: text("id"),
            site_id: text("siteId").unwrap_or_else(|| "default".into()),
            session_id: text("sessionId"),
            custom_data: query.get("customData").cloned().unwrap_or(Value::Null),
            intent_filter: None,
        }
    }

    /// The area the query's site is in: its `siteId`, unless Hermes'
    /// placeholder "default". It fills an `area` slot only when it is one
    /// of the task's areas ([`crate::engine::context`]).
    pub fn area(&self) -> Option<String> {
        (self.site_id != "default").then(|| self.site_id.clone())
    }

    /// Best effort for a payload that may not even be JSON (error answers).
    pub fn of_payload(payload: &[u8]) -> Session {
        Session::echoed(&serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null))
    }
}

/// The answer to a query: its topic and payload.
pub fn answer(output_topic: &str, s: &Session, input: &str, scores: &Scores) -> (String, Value) {
    let alternatives: Vec<Value> = scores
        .ranked
        .iter()
        .filter(|(l, _)| scores.label.as_ref() != Some(l))
        .take(3)
        .map(|(l, p)| json!({"intentName": l, "confidenceScore": round4(*p)}))
        .collect();
    let mut body = json!({
        "input": input,
        "id": s.id,
        "siteId": s.site_id,
        "sessionId": s.session_id,
        "customData": s.custom_data,
        "alternatives": alternatives,
    });
    let Some(intent) = &scores.label else {
        return (NOT_RECOGNIZED_TOPIC.into(), body);
    };
    let slots: Vec<Value> = scores
        .slots
        .iter()
        .flatten()
        .map(|slot| hermes_slot(input, slot))
        .collect();
    body["intent"] = json!({"intentName": intent, "confidenceScore": round4(scores.ranked[0].1)});
    body["slots"] = Value::Array(slots);
    (format!("{output_topic}/{intent}"), body)
}

/// An error answer (`hermes/error/nlu` unless the task names another).
pub fn error(s: &Session, reason: &str, message: &str) -> Value {
    json!({
        "sessionId": s.session_id,
        "siteId": s.site_id,
        "error": message,
        "context": reason,
    })
}

fn hermes_slot(input: &str, slot: &Slot) -> Value {
    let value = match &slot.value {
        SlotValue::Text(t) => json!({"kind": "Custom", "value": t}),
        SlotValue::Number(_) => json!({"kind": "Number", "value": slot.value}),
    };
    let mut out = json!({
        "entity": slot.name,
        "slotName": slot.name,
        "rawValue": slot.span.as_ref().map_or_else(|| slot.value.to_string(), |s| s.raw.clone()),
        "value": value,
    });
    if let Some(span) = &slot.span {
        // Hermes ranges count characters, slmd's spans bytes.
        let start = input[..span.start].chars().count();
        let end = start + span.raw.chars().count();
        out["range"] = json!({"start": start, "end": end});
    }
    out
}

fn round4(x: f32) -> f64 {
    (f64::from(x) * 10000.0).round() / 10000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schema::Span;

    fn scores(label: Option<&str>, slots: Vec<Slot>) -> Scores {
        Scores {
            ranked: vec![("HassTurnOn".into(), 0.9), ("HassTurnOff".into(), 0.1)],
            label: label.map(str::to_owned),
            slots: Some(slots),
            inference_ms: 1.0,
            tokens: 3,
        }
    }

    #[test]
    fn a_query_gives_its_session_with_hermes_defaults() {
        let q = json!({"input": "x", "id": "q1", "siteId": "kitchen", "sessionId": "s",
                       "customData": "cd", "intentFilter": ["A", "B"]});
        let s = Session::of(&q).unwrap();
        assert_eq!(s.id.as_deref(), Some("q1"));
        assert_eq!(s.site_id, "kitchen");
        assert_eq!(s.session_id.as_deref(), Some("s"));
        assert_eq!(s.custom_data, json!("cd"));
        assert_eq!(s.intent_filter, Some(vec!["A".into(), "B".into()]));
        // A filter that is not a list of names is refused, never widened.
        assert_eq!(Session::of(&json!({"intentFilter": ["A", 7]})), None);
        assert_eq!(Session::of(&json!({"intentFilter": "A"})), None);
        let s = Session::of_payload(b"\xff not json");
        assert_eq!((s.site_id.as_str(), s.session_id), ("default", None));
        assert_eq!(
            Session::of(&json!({"intentFilter": null}))
                .unwrap()
                .intent_filter,
            None
        );
    }

    #[test]
    fn a_recognised_intent_has_the_hermes_fields_and_character_ranges() {
        let input = "allume la lumière de la cuisine à 50";
        let at = input.find("cuisine").unwrap();
        let slots = vec![
            Slot {
                name: "area".into(),
                value: SlotValue::Text("Kitchen".into()),
                span: Some(Span {
                    start: at,
                    end: at + 7,
                    raw: "cuisine".into(),
                }),
            },
            Slot {
                name: "brightness".into(),
                value: SlotValue::Number(50.0),
                span: None,
            },
        ];
        let s = Session::of(&json!({"id": "q", "siteId": "k", "sessionId": "s"})).unwrap();
        let (topic, body) = answer(
            "hermes/intent",
            &s,
            input,
            &scores(Some("HassTurnOn"), slots),
        );
        assert_eq!(topic, "hermes/intent/HassTurnOn");
        assert_eq!(body["input"], input);
        assert_eq!(body["intent"]["intentName"], "HassTurnOn");
        assert_eq!(body["intent"]["confidenceScore"], 0.9);
        assert_eq!(
            (&body["id"], &body["siteId"], &body["sessionId"]),
            (&json!("q"), &json!("k"), &json!("s"))
        );
        let area = &body["slots"][0];
        assert_eq!(area["entity"], "area");
        assert_eq!(area["slotName"], "area");
        assert_eq!(area["rawValue"], "cuisine");
        assert_eq!(area["value"], json!({"kind": "Custom", "value": "Kitchen"}));
        let start = input.chars().position(|c| c == 'c').unwrap();
        assert_eq!(area["range"], json!({"start": start, "end": start + 7}));
        let chars: Vec<char> = input.chars().collect();
        assert_eq!(
            chars[start..start + 7].iter().collect::<String>(),
            "cuisine"
        );
        let level = &body["slots"][1];
        assert_eq!(level["value"], json!({"kind": "Number", "value": 50}));
        assert_eq!(level["rawValue"], "50");
        assert!(
            level.get("range").is_none(),
            "no range for a value not found in the input"
        );
        assert_eq!(body["alternatives"][0]["intentName"], "HassTurnOff");
    }

    #[test]
    fn below_threshold_is_intent_not_recognized_and_errors_carry_the_session() {
        let s = Session::of(&json!({"sessionId": "s"})).unwrap();
        let (topic, body) = answer("hermes/intent", &s, "hmm", &scores(None, vec![]));
        assert_eq!(topic, NOT_RECOGNIZED_TOPIC);
        assert_eq!(body["input"], "hmm");
        assert!(body.get("intent").is_none());
        assert_eq!(body["alternatives"][0]["intentName"], "HassTurnOn");
        let e = error(&s, "text_too_long", "too long");
        assert_eq!(
            e,
            json!({"sessionId": "s", "siteId": "default", "error": "too long", "context": "text_too_long"})
        );
    }
}
