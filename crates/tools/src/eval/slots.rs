//! Slot schemas for `slmd eval --kind extract`, inferred from labelled rows.
//!
//! Every slot name in the training rows becomes a slot, in order of first
//! appearance. A slot whose values are all numbers is a number. A slot with
//! known values (`--slot-values`) is an enum of them; otherwise it is an
//! open enum of the values seen in training (any string is allowed, the
//! seen ones guide the model and fix their spelling).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use slmd_core::examples::{slot_text, Row};
use slmd_engine::schema::{SlotKind, SlotSpec};

/// Known values of some slots: name -> (values, open).
pub type Known = BTreeMap<String, (Vec<String>, bool)>;

#[derive(Debug, thiserror::Error)]
pub enum SlotValuesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// Reads known slot values from YAML or JSON: either a map of slot name to a
/// list of values (closed enums), or a Home Assistant fixtures file, whose
/// `areas` and `floors` become the closed enums `area` and `floor` and whose
/// `entities` the open enum `name` (names also cover timers, lists and
/// places that are not entities).
pub fn read_known(path: &Path) -> Result<Known, SlotValuesError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SlotValuesError::Read {
        path: shown.clone(),
        source,
    })?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| SlotValuesError::Parse {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let bad = |message: &str| SlotValuesError::Parse {
        path: shown.clone(),
        message: message.into(),
    };
    let map = doc.as_object().ok_or_else(|| bad("expected a mapping"))?;
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let mut known = Known::new();
    if map.contains_key("areas") || map.contains_key("entities") {
        for (key, slot, open) in [
            ("areas", "area", false),
            ("floors", "floor", false),
            ("entities", "name", true),
        ] {
            if let Some(v) = map.get(key) {
                known.insert(slot.into(), (dedup(names(v)), open));
            }
        }
    } else {
        for (slot, values) in map {
            let values = values
                .as_array()
                .ok_or_else(|| bad(&format!("{slot}: expected a list of values")))?;
            let values = values.iter().filter_map(slot_text).collect();
            known.insert(slot.clone(), (dedup(values), false));
        }
    }
    Ok(known)
}

/// The schema of the slots in `rows`.
pub fn infer_schema(rows: &[Row], known: &Known) -> Vec<SlotSpec> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for slots in rows.iter().filter_map(|r| r.slots.as_ref()) {
        for (name, v) in slots {
            if !order.contains(name) {
                order.push(name.clone());
            }
            if let Some(text) = slot_text(v) {
                values.entry(name.clone()).or_default().push(text);
            }
        }
    }
    order
        .into_iter()
        .map(|name| {
            let seen = values.remove(&name).unwrap_or_default();
            let numeric = !seen.is_empty() && seen.iter().all(|v| v.parse::<f64>().is_ok());
            let kind = match known.get(&name) {
                Some((values, open)) if !values.is_empty() => SlotKind::Enum {
                    values: values.clone(),
                    open: *open,
                },
                _ if numeric => SlotKind::Number,
                _ if seen.is_empty() => SlotKind::String,
                _ => SlotKind::Enum {
                    values: dedup(seen),
                    open: true,
                },
            };
            SlotSpec { name, kind }
        })
        .collect()
}

/// Values without repeats ignoring case, first spelling kept, in order.
fn dedup(values: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    values
        .into_iter()
        .filter(|v| !v.trim().is_empty() && seen.insert(v.to_lowercase()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(intent: &str, slots: Value) -> Row {
        Row {
            text: "x".into(),
            intent: intent.into(),
            slots: slots.as_object().cloned(),
            context: Default::default(),
        }
    }

    #[test]
    fn numbers_known_values_and_seen_values_make_the_schema() {
        let rows = vec![
            row(
                "A",
                serde_json::json!({"area": "Kitchen", "brightness": 50}),
            ),
            row(
                "B",
                serde_json::json!({"name": ["pizza ", "pizza"], "brightness": "20"}),
            ),
            row("B", serde_json::json!({"name": "Pizza", "item": "apples"})),
        ];
        let mut known = Known::new();
        known.insert(
            "area".into(),
            (vec!["Kitchen".into(), "Office".into()], false),
        );
        let schema = infer_schema(&rows, &known);
        let names: Vec<&str> = schema.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["area", "brightness", "name", "item"]);
        assert_eq!(
            schema[0].kind,
            SlotKind::Enum {
                values: vec!["Kitchen".into(), "Office".into()],
                open: false
            }
        );
        assert_eq!(schema[1].kind, SlotKind::Number);
        assert_eq!(
            schema[2].kind,
            SlotKind::Enum {
                values: vec!["pizza".into()],
                open: true
            },
            "seen values, trimmed, once ignoring case"
        );
        slmd_engine::schema::validate_schema(&schema).unwrap();
    }

    #[test]
    fn home_assistant_fixtures_give_areas_floors_and_names() {
        let (_dir, path) = crate::eval::temp_file(
            "fixtures.yaml",
            "language: en\nfloors:\n  - name: \"Upstairs\"\n    id: up\nareas:\n  - name: \"Kitchen\"\n    id: k\n    floor: up\nentities:\n  - name: \"TV\"\n    id: media_player.tv\n",
        );
        let known = read_known(&path).unwrap();
        assert_eq!(known["area"], (vec!["Kitchen".to_string()], false));
        assert_eq!(known["floor"], (vec!["Upstairs".to_string()], false));
        assert_eq!(known["name"], (vec!["TV".to_string()], true));

        std::fs::write(&path, r#"{"color": ["red", "Red", "blue"]}"#).unwrap();
        let known = read_known(&path).unwrap();
        assert_eq!(known["color"], (vec!["red".into(), "blue".into()], false));
    }
}
