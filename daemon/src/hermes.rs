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
//! and answers on one of three topics, echoing `id`, `siteId`, `sessionId`,
//! `customData`, `lang`, `wakewordId` and `asrConfidence` as they came:
//!
//! - `<output_topic>/<intentName>`: `input`, `rawInput`, `intent`
//!   (`intentName`, `confidenceScore`), `slots` (`entity`, `slotName`,
//!   `rawValue`, `value` as `{"kind", "value"}`, `range` in characters of
//!   `input`, and `confidence` = `confidenceScore`: Rhasspy reads the
//!   first, Snips the second), `alternatives`;
//! - `hermes/nlu/intentNotRecognized` below the task's threshold (or for
//!   the reject label): `input` and the `alternatives`;
//! - `hermes/error/nlu` for a query that cannot be read or inferred:
//!   `error` (the message) and `context` (slmd's reason code).
//!
//! With the task's `hermes_intent_parsed = true`, a recognised query is
//! also announced on `hermes/nlu/intentParsed` (Rhasspy's NLU services do
//! this; its dialogue manager does not need it), see [`parsed`].
//!
//! `intentFilter` restricts the intents chosen among (see
//! [`slmd_engine::Query::among`]); `null` and `[]` both mean no
//! filter, as in Rhasspy, whose dialogue manager sends `[]` when nothing
//! restricts the next turn. Entity injection (`hermes/injection/perform`)
//! is in [`crate::injection`].

use serde_json::{json, Value};

use crate::payload::round4;
use slmd_engine::schema::{Slot, SlotValue};
use slmd_engine::Scores;

pub const NOT_RECOGNIZED_TOPIC: &str = "hermes/nlu/intentNotRecognized";
pub const ERROR_TOPIC: &str = "hermes/error/nlu";
pub const INTENT_PARSED_TOPIC: &str = "hermes/nlu/intentParsed";

/// What a query brings besides its input; echoed in every answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The query's own `id` (Hermes allows null).
    pub id: Option<String>,
    pub site_id: String,
    pub session_id: Option<String>,
    /// Opaque to the NLU; returned as it came.
    pub custom_data: Value,
    /// `lang`, `wakewordId` and `asrConfidence`: what the ASR and wake
    /// word services said about the utterance. Rhasspy's dialogue manager
    /// and intent handlers read them from the intent, so they are returned
    /// as they came (null when absent).
    pub lang: Value,
    pub wakeword_id: Value,
    pub asr_confidence: Value,
    /// `intentFilter`: only these intents may be recognised.
    pub intent_filter: Option<Vec<String>>,
}

impl Session {
    /// From a query object; missing or mistyped fields take Hermes'
    /// defaults (`siteId` "default", no session). An empty `intentFilter`
    /// is no filter, as in Rhasspy (its dialogue manager sends `[]` for
    /// "any intent"); one that is not null or a list of names gives
    /// `None`: a filter must never silently widen to every intent.
    pub fn of(query: &Value) -> Option<Session> {
        let filter = match query.get("intentFilter") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
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
        let echo = |k: &str| query.get(k).cloned().unwrap_or(Value::Null);
        Session {
            id: text("id"),
            site_id: text("siteId").unwrap_or_else(|| "default".into()),
            session_id: text("sessionId"),
            custom_data: echo("customData"),
            lang: echo("lang"),
            wakeword_id: echo("wakewordId"),
            asr_confidence: echo("asrConfidence"),
            intent_filter: None,
        }
    }

    /// The area the query's site is in: its `siteId`, unless Hermes'
    /// placeholder "default". It fills an `area` slot only when it is one
    /// of the task's areas ([`slmd_engine::context`]).
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
        "lang": s.lang,
        "wakewordId": s.wakeword_id,
        "asrConfidence": s.asr_confidence,
        "alternatives": alternatives,
    });
    // Which stage answered; Hermes clients ignore keys they do not know.
    body["by"] = json!(scores.by);
    let Some(intent) = &scores.label else {
        if let Some(why) = scores.unrecognised {
            body["notRecognised"] = json!(why);
        }
        return (NOT_RECOGNIZED_TOPIC.into(), body);
    };
    let confidence = scores.ranked.first().map_or(0.0, |r| round4(r.1));
    let slots: Vec<Value> = scores
        .slots
        .iter()
        .flatten()
        .map(|slot| hermes_slot(input, slot, confidence))
        .collect();
    body["rawInput"] = json!(input);
    body["intent"] = json!({"intentName": intent, "confidenceScore": confidence});
    body["slots"] = Value::Array(slots);
    (format!("{output_topic}/{intent}"), body)
}

/// The `hermes/nlu/intentParsed` announcement of a recognised query, made
/// from its answer: `input`, `intent`, `slots`, `id`, `siteId`,
/// `sessionId`. `None` for an answer that recognised nothing (Hermes has
/// no "parsed" form of `intentNotRecognized`).
pub fn parsed(answer: &Value) -> Option<(String, Value)> {
    let intent = answer.get("intent")?;
    let field = |k: &str| answer.get(k).cloned().unwrap_or(Value::Null);
    let body = json!({
        "input": field("input"),
        "intent": intent,
        "slots": field("slots"),
        "id": field("id"),
        "siteId": field("siteId"),
        "sessionId": field("sessionId"),
    });
    Some((INTENT_PARSED_TOPIC.into(), body))
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

/// A slot as Hermes has it. slmd scores the intent, not each slot (a
/// slot is read from the text or written under the intent's grammar), so
/// a slot's confidence is its intent's: Rhasspy reads `confidence`
/// (0.0 when missing), Snips `confidenceScore`.
fn hermes_slot(input: &str, slot: &Slot, confidence: f64) -> Value {
    let value = match &slot.value {
        SlotValue::Text(t) => json!({"kind": "Custom", "value": t}),
        SlotValue::Number(_) => json!({"kind": "Number", "value": slot.value}),
    };
    let mut out = json!({
        "entity": slot.name,
        "slotName": slot.name,
        "rawValue": slot.span.as_ref().map_or_else(|| slot.value.to_string(), |s| s.raw.clone()),
        "value": value,
        "confidence": confidence,
        "confidenceScore": confidence,
    });
    if let Some(span) = &slot.span {
        // Hermes ranges count characters, slmd's spans bytes.
        let start = input[..span.start].chars().count();
        let end = start + span.raw.chars().count();
        out["range"] = json!({"start": start, "end": end});
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use slmd_engine::schema::Span;

    fn scores(label: Option<&str>, slots: Vec<Slot>) -> Scores {
        Scores {
            ranked: vec![("HassTurnOn".into(), 0.9), ("HassTurnOff".into(), 0.1)],
            label: label.map(str::to_owned),
            slots: Some(slots),
            inference_ms: 1.0,
            tokens: 3,
            by: slmd_engine::Stage::Model,
            unrecognised: label
                .is_none()
                .then_some(slmd_engine::Unrecognised::UnlikeExamples),
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

    /// A query as rhasspy-hermes' `NluQuery.payload()` writes it (every
    /// field present, most of them null).
    const RHASSPY_QUERY: &str = r#"{"input": "turn on the kitchen light", "siteId": "kitchen",
        "id": "q7", "intentFilter": [], "sessionId": "s7", "wakewordId": "porcupine",
        "lang": "en", "customData": "{\"turn\": 2}", "asrConfidence": 0.87,
        "customEntities": null}"#;

    #[test]
    fn rhasspy_fields_are_echoed_and_an_empty_filter_is_no_filter() {
        let q: Value = serde_json::from_str(RHASSPY_QUERY).unwrap();
        let s = Session::of(&q).unwrap();
        assert_eq!(s.intent_filter, None, "[] means any intent in Rhasspy");
        let (_, body) = answer(
            "hermes/intent",
            &s,
            "x",
            &scores(Some("HassTurnOn"), vec![]),
        );
        assert_eq!(body["lang"], "en");
        assert_eq!(body["wakewordId"], "porcupine");
        assert_eq!(body["asrConfidence"], 0.87);
        assert_eq!(body["customData"], "{\"turn\": 2}");
        assert_eq!(
            (&body["id"], &body["sessionId"]),
            (&json!("q7"), &json!("s7"))
        );
        assert_eq!(body["rawInput"], "x");
        // Not recognised answers echo them too.
        let (topic, body) = answer("hermes/intent", &s, "x", &scores(None, vec![]));
        assert_eq!(topic, NOT_RECOGNIZED_TOPIC);
        assert_eq!(body["notRecognised"], "unlike_examples");
        assert_eq!(
            (&body["lang"], &body["wakewordId"], &body["asrConfidence"]),
            (&json!("en"), &json!("porcupine"), &json!(0.87))
        );
        // Absent fields are echoed as null, never invented.
        let s = Session::of(&json!({"input": "x"})).unwrap();
        let (_, body) = answer("hermes/intent", &s, "x", &scores(None, vec![]));
        assert_eq!(
            (&body["lang"], &body["wakewordId"], &body["asrConfidence"]),
            (&Value::Null, &Value::Null, &Value::Null)
        );
    }

    #[test]
    fn slots_carry_the_intent_confidence_under_both_names() {
        let slot = Slot {
            name: "area".into(),
            value: SlotValue::Text("Kitchen".into()),
            span: None,
        };
        let s = Session::of(&json!({})).unwrap();
        let (_, body) = answer(
            "hermes/intent",
            &s,
            "x",
            &scores(Some("HassTurnOn"), vec![slot]),
        );
        let slot = &body["slots"][0];
        assert_eq!(slot["confidence"], 0.9, "Rhasspy reads 0.0 when missing");
        assert_eq!(slot["confidenceScore"], 0.9, "Snips' name");
    }

    #[test]
    fn intent_parsed_announces_a_recognised_query_only() {
        let q: Value = serde_json::from_str(RHASSPY_QUERY).unwrap();
        let s = Session::of(&q).unwrap();
        let slot = Slot {
            name: "area".into(),
            value: SlotValue::Text("Kitchen".into()),
            span: None,
        };
        let (_, body) = answer(
            "hermes/intent",
            &s,
            "x",
            &scores(Some("HassTurnOn"), vec![slot]),
        );
        let (topic, p) = parsed(&body).unwrap();
        assert_eq!(topic, "hermes/nlu/intentParsed");
        assert_eq!(p["intent"], body["intent"]);
        assert_eq!(p["slots"], body["slots"]);
        assert_eq!(
            (&p["input"], &p["id"], &p["siteId"], &p["sessionId"]),
            (&json!("x"), &json!("q7"), &json!("kitchen"), &json!("s7"))
        );
        let (_, none) = answer("hermes/intent", &s, "x", &scores(None, vec![]));
        assert_eq!(parsed(&none), None);
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
