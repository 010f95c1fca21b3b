//! Entity injection: a home's areas, floors and device names change without
//! editing the configuration, as Snips and Rhasspy do it over Hermes.
//!
//! A request on `hermes/injection/perform` (taken when a task speaks
//! Hermes) lists operations on entities, an entity being the name of an
//! `enum` slot:
//!
//! ```json
//! {"id": "r1", "operations": [
//!   ["addFromVanilla", {"area": ["Attic", "Cellar"]}],
//!   ["add", {"name": ["Desk Lamp"]}],
//!   ["replace", {"floor": ["Loft"]}]]}
//! ```
//!
//! - `add`: the values join the entity's current ones;
//! - `addFromVanilla`: the entity goes back to the configuration's values,
//!   then the given ones join them;
//! - `replace` (slmd's own): the entity's values become exactly these.
//!
//! What was injected is kept in `<state>/injections.json` (written to a
//! temporary file, fsynced, renamed), so it survives restarts and
//! configuration reloads; it is applied on top of the configuration every
//! time an engine is built ([`Injected::apply`]). The supervisor applies a
//! request by building a new engine (the slot grammars change) and swapping
//! it in like a reload, then answers `hermes/injection/complete`
//! `{"requestId": ...}`; a refused request is answered on
//! `hermes/error/injection` with the reason ([`refusal`]), and with its
//! `requestId` too whenever the payload had a readable `id`, even when
//! the rest of it could not be parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, TaskKind};
use slmd_engine::schema::{add_value, SlotKind, MAX_STRING_CHARS};

pub const PERFORM_TOPIC: &str = "hermes/injection/perform";
pub const COMPLETE_TOPIC: &str = "hermes/injection/complete";
pub const ERROR_TOPIC: &str = "hermes/error/injection";

/// Values one entity may hold (each becomes a grammar alternative).
pub const MAX_VALUES: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum InjectionError {
    #[error("not an injection request: {0}")]
    BadRequest(String),
    #[error("{0:?} is not an enum slot of any task")]
    UnknownEntity(String),
    #[error("entity {entity:?}: {why}")]
    BadValues { entity: String, why: String },
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl InjectionError {
    /// Machine-readable reason, as in every slmd error answer.
    pub fn reason(&self) -> &'static str {
        match self {
            InjectionError::BadRequest(_) => "bad_request",
            InjectionError::UnknownEntity(_) => "unknown_entity",
            InjectionError::BadValues { .. } => "bad_values",
            InjectionError::Read { .. } | InjectionError::Write { .. } => "storage",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    AddFromVanilla,
    Replace,
}

/// A parsed `hermes/injection/perform` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<String>,
    pub operations: Vec<(Op, BTreeMap<String, Vec<String>>)>,
}

/// One entity's injected state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    /// Whether the configuration's own values still count.
    pub vanilla: bool,
    /// Values added on top (or, without `vanilla`, the only ones).
    pub values: Vec<String>,
}

/// Everything injected so far, by entity (slot) name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Injected {
    pub entities: BTreeMap<String, Entity>,
}

/// The `id` of a request payload, read on its own so that a request
/// refused as unreadable is still answered with its `requestId`.
pub fn request_id(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(payload)
        .ok()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

/// The answer to a refused request, on [`ERROR_TOPIC`]: `requestId`
/// (null when the request had none), `error` (what is wrong) and
/// `context` (the reason code).
pub fn refusal(request_id: Option<&str>, reason: &str, why: &str) -> Value {
    serde_json::json!({"requestId": request_id, "error": why, "context": reason})
}

pub fn parse(payload: &[u8]) -> Result<Request, InjectionError> {
    let bad = |why: &str| InjectionError::BadRequest(why.to_owned());
    let v: Value = serde_json::from_slice(payload).map_err(|e| bad(&e.to_string()))?;
    let id = v.get("id").and_then(Value::as_str).map(str::to_owned);
    let ops = v
        .get("operations")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"operations\" array"))?;
    let mut operations = Vec::with_capacity(ops.len());
    for op in ops {
        let (Some(kind), Some(entities)) = (
            op.get(0).and_then(Value::as_str),
            op.get(1).and_then(Value::as_object),
        ) else {
            return Err(bad("each operation is [\"add\" | \"addFromVanilla\" | \"replace\", {entity: [values]}]"));
        };
        let kind = match kind {
            "add" => Op::Add,
            "addFromVanilla" => Op::AddFromVanilla,
            "replace" => Op::Replace,
            other => return Err(bad(&format!("unknown operation {other:?}"))),
        };
        let mut by_entity = BTreeMap::new();
        for (entity, values) in entities {
            let values = values
                .as_array()
                .ok_or_else(|| bad(&format!("{entity:?}: values must be a list")))?;
            // Snips also allows [value, weight] pairs; the weight is unused.
            let values = values
                .iter()
                .map(|x| x.as_str().or_else(|| x.get(0).and_then(Value::as_str)))
                .map(|x| x.map(|s| s.trim().to_owned()))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| bad(&format!("{entity:?}: values must be strings")))?;
            by_entity.insert(entity.clone(), values);
        }
        operations.push((kind, by_entity));
    }
    Ok(Request { id, operations })
}

impl Injected {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("injections.json")
    }

    /// What is in `<state>/injections.json`; nothing when it does not exist.
    pub fn load(state_dir: &Path) -> Result<Injected, InjectionError> {
        let path = Injected::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| InjectionError::Read {
                path,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Injected::default()),
            Err(e) => Err(InjectionError::Read {
                path,
                why: e.to_string(),
            }),
        }
    }

    /// Atomically: a crash leaves the old file or the new one.
    pub fn save(&self, state_dir: &Path) -> Result<(), InjectionError> {
        let path = Injected::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        slmd_core::fsutil::write_atomic(&path, &bytes).map_err(|source| InjectionError::Write {
            path: path.clone(),
            source,
        })
    }

    /// Applies a request after checking it against `config`: every entity
    /// must be an enum slot of some task, and keep at least one value.
    pub fn perform(&mut self, req: &Request, config: &Config) -> Result<(), InjectionError> {
        let mut next = self.clone();
        for (op, entities) in &req.operations {
            for (name, values) in entities {
                let vanilla = vanilla_values(config, name)
                    .ok_or_else(|| InjectionError::UnknownEntity(name.clone()))?;
                let bad = |why: String| InjectionError::BadValues {
                    entity: name.clone(),
                    why,
                };
                if let Some(v) = values
                    .iter()
                    .find(|v| v.is_empty() || v.chars().count() > MAX_STRING_CHARS)
                {
                    return Err(bad(format!(
                        "{v:?}: a value has 1 to {MAX_STRING_CHARS} characters"
                    )));
                }
                let e = next
                    .entities
                    .entry(name.clone())
                    .or_insert_with(Entity::vanilla);
                match op {
                    Op::Add => {}
                    Op::AddFromVanilla => *e = Entity::vanilla(),
                    Op::Replace => {
                        *e = Entity {
                            vanilla: false,
                            values: Vec::new(),
                        }
                    }
                }
                for v in values {
                    add_value(&mut e.values, v);
                }
                let n = e.values.len() + if e.vanilla { vanilla.len() } else { 0 };
                if n == 0 {
                    return Err(bad("an entity needs at least one value".into()));
                }
                if n > MAX_VALUES {
                    return Err(bad(format!("{n} values; at most {MAX_VALUES}")));
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// `config` with the injected values in its tasks' enum slots.
    pub fn apply(&self, config: &Config) -> Config {
        let mut out = config.clone();
        for task in &mut out.tasks {
            let TaskKind::Extract(extract) = &mut task.kind else {
                continue;
            };
            for slot in &mut extract.slots {
                let (Some(e), SlotKind::Enum { values, .. }) =
                    (self.entities.get(&slot.name), &mut slot.kind)
                else {
                    continue;
                };
                if !e.vanilla {
                    values.clear();
                }
                for v in &e.values {
                    add_value(values, v);
                }
            }
        }
        out
    }
}

impl Entity {
    /// The configuration's values and nothing more.
    fn vanilla() -> Entity {
        Entity {
            vanilla: true,
            values: Vec::new(),
        }
    }
}

/// The configuration's values of enum slot `name` (of the first task that
/// has one); `None` when no task has such an enum slot.
fn vanilla_values(config: &Config, name: &str) -> Option<Vec<String>> {
    config
        .tasks
        .iter()
        .flat_map(|t| t.slots())
        .find_map(|s| match &s.kind {
            SlotKind::Enum { values, .. } if s.name == name => Some(values.clone()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
[broker]
client_id = "t"
[state]
dir = "/tmp"
[model]
path = "m.gguf"
[[tasks]]
name = "home"
kind = "extract"
topics = ["in"]
output_topic = "out"
labels = [{ name = "On" }, { name = "Off" }]
slots = [
  { name = "area", type = "enum", values = ["Kitchen", "Hall"] },
  { name = "level", type = "number" },
]
"#;
        toml::from_str(text).unwrap()
    }

    fn areas(c: &Config) -> Vec<String> {
        match &c.tasks[0].slots()[0].kind {
            SlotKind::Enum { values, .. } => values.clone(),
            _ => unreachable!(),
        }
    }

    fn request(json: &str) -> Request {
        parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn add_add_from_vanilla_and_replace() {
        let c = config();
        let mut inj = Injected::default();
        let r = request(r#"{"id": "r1", "operations": [["add", {"area": ["Attic", "kitchen"]}]]}"#);
        assert_eq!(r.id.as_deref(), Some("r1"));
        inj.perform(&r, &c).unwrap();
        assert_eq!(areas(&inj.apply(&c)), ["Kitchen", "Hall", "Attic"]);
        inj.perform(
            &request(r#"{"operations": [["add", {"area": [["Cellar", 1.0]]}]]}"#),
            &c,
        )
        .unwrap();
        assert_eq!(
            areas(&inj.apply(&c)),
            ["Kitchen", "Hall", "Attic", "Cellar"]
        );
        inj.perform(
            &request(r#"{"operations": [["addFromVanilla", {"area": ["Loft"]}]]}"#),
            &c,
        )
        .unwrap();
        assert_eq!(areas(&inj.apply(&c)), ["Kitchen", "Hall", "Loft"]);
        inj.perform(
            &request(r#"{"operations": [["replace", {"area": ["Barn", "Shed"]}]]}"#),
            &c,
        )
        .unwrap();
        assert_eq!(areas(&inj.apply(&c)), ["Barn", "Shed"]);
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let c = config();
        let mut inj = Injected::default();
        let reason = |inj: &mut Injected, json: &str| match parse(json.as_bytes()) {
            Err(e) => e.reason(),
            Ok(r) => inj.perform(&r, &c).unwrap_err().reason(),
        };
        assert_eq!(reason(&mut inj, "not json"), "bad_request");
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["drop", {}]]}"#),
            "bad_request"
        );
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["add", {"area": [1]}]]}"#),
            "bad_request"
        );
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["add", {"level": ["x"]}]]}"#),
            "unknown_entity"
        );
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["add", {"room": ["x"]}]]}"#),
            "unknown_entity"
        );
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["replace", {"area": []}]]}"#),
            "bad_values"
        );
        assert_eq!(
            reason(&mut inj, r#"{"operations": [["add", {"area": [""]}]]}"#),
            "bad_values"
        );
        // A refused operation leaves the earlier ones of its request undone too.
        let r =
            request(r#"{"operations": [["add", {"area": ["Attic"]}], ["add", {"room": ["x"]}]]}"#);
        assert!(inj.perform(&r, &c).is_err());
        assert_eq!(inj, Injected::default());
    }

    #[test]
    fn a_refusal_carries_the_request_id_even_when_the_request_is_unreadable() {
        // Valid JSON with an id, but no operations: refused as bad_request.
        let payload = br#"{"id": "r9", "operations": "add everything"}"#;
        let e = parse(payload).unwrap_err();
        assert_eq!(e.reason(), "bad_request");
        let id = request_id(payload);
        assert_eq!(id.as_deref(), Some("r9"));
        let body = refusal(id.as_deref(), e.reason(), &e.to_string());
        assert_eq!(body["requestId"], "r9");
        assert_eq!(body["context"], "bad_request");
        assert!(body["error"].as_str().unwrap().contains("operations"));
        // No id to give: requestId is null, never left out.
        let body = refusal(request_id(b"not json").as_deref(), "bad_request", "x");
        assert_eq!(body.get("requestId"), Some(&Value::Null));
    }

    #[test]
    fn injections_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Injected::load(dir.path()).unwrap(), Injected::default());
        let c = config();
        let mut inj = Injected::default();
        inj.perform(
            &request(r#"{"operations": [["replace", {"area": ["Barn"]}]]}"#),
            &c,
        )
        .unwrap();
        inj.save(dir.path()).unwrap();
        let back = Injected::load(dir.path()).unwrap();
        assert_eq!(areas(&back.apply(&c)), ["Barn"]);
        std::fs::write(dir.path().join("injections.json"), "{").unwrap();
        assert_eq!(Injected::load(dir.path()).unwrap_err().reason(), "storage");
    }
}
