//! Labelled examples: the rows a task learns from and `slmd eval` reads.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

/// A line of a labelled JSONL file (the datasets' format: extra keys ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    pub text: String,
    pub intent: String,
    /// Slot name to value, for extraction; absent when not annotated.
    #[serde(default)]
    pub slots: Option<Slots>,
    /// The speaker's situation (Home Assistant's test `context`, such as
    /// the satellite's `area`), given to the engine with the text.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

impl Row {
    /// A row without slots or context.
    pub fn new(text: impl Into<String>, intent: impl Into<String>) -> Row {
        Row {
            text: text.into(),
            intent: intent.into(),
            slots: None,
            context: BTreeMap::new(),
        }
    }
}

/// Slot values as annotated: strings, numbers, or a list of acceptable
/// spellings (the first is used).
pub type Slots = serde_json::Map<String, serde_json::Value>;

/// One training example of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: String,
    /// Its slots when annotated (only annotated examples are shown to the
    /// model as extraction examples).
    pub slots: Option<Slots>,
}

impl From<Row> for Example {
    fn from(r: Row) -> Example {
        Example {
            text: r.text,
            label: r.intent,
            slots: r.slots,
        }
    }
}

/// An annotated slot value as one string: a list gives its first entry,
/// trimmed; numbers print as JSON does. `None` for null or empty values.
pub fn slot_text(v: &serde_json::Value) -> Option<String> {
    let s = match v {
        serde_json::Value::String(s) => s.trim().to_owned(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Array(a) => return a.first().and_then(slot_text),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// Trimmed, lowercased, inner whitespace collapsed to single spaces.
fn normalise(value: &str) -> String {
    value
        .split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether two slot values are equal after normalisation (numerically when
/// both parse as numbers).
pub fn slot_values_match(a: &str, b: &str) -> bool {
    let (a, b) = (normalise(a), normalise(b));
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) if x == y => true,
        _ => a == b,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExamplesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Row {
        path: String,
        line: usize,
        message: String,
    },
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Row>, ExamplesError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ExamplesError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ExamplesError::Read {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line).map_err(|e| ExamplesError::Row {
            path: shown.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        rows.push(row);
    }
    Ok(rows)
}
