//! What an upstream may answer for a task: the JSON schema it is sent, and
//! the check every answer passes before it can become a result. An answer
//! outside the label set or the slot schema is refused, never published.

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use slmd_engine::schema::{self, SchemaError, Slot, SlotKind, SlotSpec};

/// A task's labels and, for an extract task, its slots.
#[derive(Debug, Clone)]
pub struct Shape {
    pub labels: Vec<String>,
    /// `None` for a classify task.
    pub slots: Option<Vec<SlotSpec>>,
    /// Intents that may fill only some of the slots.
    pub label_slots: HashMap<String, Vec<String>>,
}

/// An upstream's answer that fits the shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `None`: the upstream found none of the labels fits (out of scope).
    pub label: Option<String>,
    /// For an extract task; empty when nothing was recognised.
    pub slots: Option<Vec<Slot>>,
}

/// Why an answer was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("the answer is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("the answer has no \"label\" (or \"intent\") key")]
    NoLabel,
    #[error("{0:?} is not one of the task's labels")]
    UnknownLabel(String),
    #[error("the label must be a string or null")]
    LabelNotText,
    #[error("\"slots\" must be an object")]
    SlotsNotAnObject,
    #[error("slots: {0}")]
    Slots(SchemaError),
    #[error("intent {intent:?} has no slot {slot:?}")]
    SlotNotForIntent { intent: String, slot: String },
}

impl Refused {
    /// A fixed name for it, for results.
    pub fn code(&self) -> &'static str {
        match self {
            Refused::NotAnObject(_) => "not_an_object",
            Refused::NoLabel => "no_label",
            Refused::UnknownLabel(_) => "unknown_label",
            Refused::LabelNotText => "label_not_text",
            Refused::SlotsNotAnObject => "slots_not_an_object",
            Refused::Slots(_) => "bad_slots",
            Refused::SlotNotForIntent { .. } => "slot_not_for_intent",
        }
    }
}

impl Shape {
    /// The labels a request may get: all, or those a Hermes
    /// `intentFilter` allows.
    pub fn narrowed(&self, among: Option<&[String]>) -> Shape {
        let mut s = self.clone();
        if let Some(among) = among {
            s.labels.retain(|l| among.contains(l));
        }
        s
    }

    /// The JSON schema of an answer: `{"label": one of the labels or null}`
    /// for a classify task, `{"intent": ..., "slots": {...}}` for an
    /// extract task.
    pub fn json_schema(&self) -> Value {
        let mut choices: Vec<Value> = self.labels.iter().map(|l| json!(l)).collect();
        choices.push(Value::Null);
        let Some(slots) = &self.slots else {
            return json!({
                "type": "object",
                "properties": {"label": {"enum": choices}},
                "required": ["label"],
                "additionalProperties": false,
            });
        };
        let properties: Map<String, Value> = slots
            .iter()
            .map(|s| {
                let t = match &s.kind {
                    SlotKind::String | SlotKind::Enum { open: true, .. } => {
                        json!({"type": "string"})
                    }
                    SlotKind::Number => json!({"type": "number"}),
                    SlotKind::Enum { values, .. } => json!({"enum": values}),
                };
                (s.name.clone(), t)
            })
            .collect();
        json!({
            "type": "object",
            "properties": {
                "intent": {"enum": choices},
                "slots": {"type": "object", "properties": properties, "additionalProperties": false},
            },
            "required": ["intent", "slots"],
            "additionalProperties": false,
        })
    }

    /// Checks an answer to `input`: the label must be one of the labels
    /// (any case; the task's spelling comes back) or null; slots must fit
    /// the schema and the intent. Spans are found in `input`.
    pub fn check(&self, answer: &Value, input: &str) -> Result<Verdict, Refused> {
        let Some(obj) = answer.as_object() else {
            return Err(Refused::NotAnObject(excerpt(&answer.to_string())));
        };
        let label = match obj.get("label").or_else(|| obj.get("intent")) {
            None => return Err(Refused::NoLabel),
            Some(Value::Null) => None,
            Some(Value::String(l)) => Some(
                self.labels
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(l.trim()))
                    .cloned()
                    .ok_or_else(|| Refused::UnknownLabel(excerpt(l)))?,
            ),
            Some(_) => return Err(Refused::LabelNotText),
        };
        let Some(specs) = &self.slots else {
            return Ok(Verdict { label, slots: None });
        };
        let given = match obj.get("slots") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(Refused::SlotsNotAnObject),
        };
        let Some(intent) = label else {
            return Ok(Verdict {
                label: None,
                slots: Some(Vec::new()),
            });
        };
        let slots =
            schema::parse_output(specs, &given.to_string(), input).map_err(Refused::Slots)?;
        if let Some(allowed) = self.label_slots.get(&intent) {
            if let Some(s) = slots.iter().find(|s| !allowed.contains(&s.name)) {
                return Err(Refused::SlotNotForIntent {
                    intent,
                    slot: s.name.clone(),
                });
            }
        }
        Ok(Verdict {
            label: Some(intent),
            slots: Some(slots),
        })
    }
}

/// At most 80 characters of something an upstream sent, for a message.
pub fn excerpt(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract() -> Shape {
        let slots: Vec<SlotSpec> = serde_json::from_value(json!([
            {"name": "area", "type": "enum", "values": ["Kitchen", "Hall"]},
            {"name": "temperature", "type": "number"},
        ]))
        .unwrap();
        Shape {
            labels: vec!["HassTurnOn".into(), "HassClimateSetTemperature".into()],
            slots: Some(slots),
            label_slots: [("HassTurnOn".to_owned(), vec!["area".to_owned()])].into(),
        }
    }

    #[test]
    fn an_answer_in_the_schema_is_taken_in_the_tasks_spelling_with_spans() {
        let v = extract()
            .check(
                &json!({"intent": "hassturnon", "slots": {"area": "kitchen"}}),
                "kitchen on please",
            )
            .unwrap();
        assert_eq!(v.label.as_deref(), Some("HassTurnOn"));
        let slots = v.slots.unwrap();
        assert_eq!(slots[0].value.to_string(), "Kitchen");
        assert_eq!(slots[0].span.as_ref().map(|s| s.start), Some(0));
        let none = extract().check(&json!({"intent": null, "slots": {}}), "x");
        assert_eq!(
            none.unwrap(),
            Verdict {
                label: None,
                slots: Some(vec![])
            }
        );
    }

    #[test]
    fn answers_outside_the_labels_or_slots_are_refused() {
        let s = extract();
        let refused = |v: Value| s.check(&v, "set it to 21").unwrap_err();
        assert_eq!(
            refused(json!({"intent": "HassUnlockDoor", "slots": {}})),
            Refused::UnknownLabel("HassUnlockDoor".into())
        );
        assert!(matches!(
            refused(json!({"intent": "HassTurnOn", "slots": {"area": "Garage"}})),
            Refused::Slots(_)
        ));
        assert!(matches!(
            refused(json!({"intent": "HassTurnOn", "slots": {"colour": "red"}})),
            Refused::Slots(_)
        ));
        assert_eq!(
            refused(json!({"intent": "HassTurnOn", "slots": {"temperature": 21}})),
            Refused::SlotNotForIntent {
                intent: "HassTurnOn".into(),
                slot: "temperature".into()
            }
        );
        assert_eq!(
            refused(json!(["HassTurnOn"])),
            Refused::NotAnObject("[\"HassTurnOn\"]".into())
        );
        assert_eq!(refused(json!({"answer": "HassTurnOn"})), Refused::NoLabel);
        assert_eq!(refused(json!({"intent": 3})), Refused::LabelNotText);
        assert_eq!(
            refused(json!({"intent": "HassTurnOn", "slots": []})),
            Refused::SlotsNotAnObject
        );
    }

    #[test]
    fn the_schema_lists_the_labels_a_filter_allows_and_null() {
        let s = extract().narrowed(Some(&["HassTurnOn".to_owned()]));
        let schema = s.json_schema();
        assert_eq!(
            schema["properties"]["intent"]["enum"],
            json!(["HassTurnOn", null])
        );
        assert_eq!(
            schema["properties"]["slots"]["properties"]["area"]["enum"],
            json!(["Kitchen", "Hall"])
        );
        let classify = Shape {
            labels: vec!["on".into()],
            slots: None,
            label_slots: HashMap::new(),
        };
        assert_eq!(classify.json_schema()["required"], json!(["label"]));
        assert_eq!(
            classify
                .check(&json!({"label": "ON"}), "x")
                .unwrap()
                .label
                .as_deref(),
            Some("on")
        );
    }
}
