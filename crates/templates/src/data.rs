//! Home Assistant's intent files as that project distributes them: one
//! JSON file per language in the `home-assistant-intents` package, or the
//! YAML sentence files users write for their own commands (same fields).
//! Also the home: its areas, floors and entities.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
pub struct IntentsFile {
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub skip_words: Vec<String>,
    #[serde(default)]
    pub intents: BTreeMap<String, IntentFile>,
    #[serde(default)]
    pub lists: BTreeMap<String, ListFile>,
    #[serde(default)]
    pub expansion_rules: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub struct IntentFile {
    #[serde(default)]
    pub data: Vec<BlockFile>,
}

#[derive(Debug, Deserialize)]
pub struct BlockFile {
    pub sentences: Vec<String>,
    /// Fixed slot values every sentence of the block gives.
    #[serde(default)]
    pub slots: BTreeMap<String, Value>,
    #[serde(default)]
    pub requires_context: BTreeMap<String, Value>,
    #[serde(default)]
    pub excludes_context: BTreeMap<String, Value>,
    /// Rules and lists only this block's sentences see.
    #[serde(default)]
    pub expansion_rules: BTreeMap<String, String>,
    #[serde(default)]
    pub lists: BTreeMap<String, ListFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ListFile {
    Values { values: Vec<ValueFile> },
    Range { range: RangeFile },
    Wildcard { wildcard: bool },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ValueFile {
    Text(String),
    Full {
        #[serde(rename = "in")]
        text: String,
        #[serde(default)]
        out: Option<Value>,
        #[serde(default)]
        context: BTreeMap<String, Value>,
    },
}

#[derive(Debug, Clone, Deserialize)]
pub struct RangeFile {
    pub from: f64,
    pub to: f64,
    #[serde(default)]
    pub step: Option<f64>,
    #[serde(default)]
    pub multiplier: Option<f64>,
    /// `halves` or `tenths` admit 21.5 or 21.3; whole numbers only without.
    #[serde(default)]
    pub fractions: Option<String>,
}

/// The home the sentences talk about: it fills the `area`, `floor` and
/// `name` lists, and an entity's context (its domain, device class)
/// decides which sentences may name it.
#[derive(Debug, Clone, Default)]
pub struct Home {
    pub areas: Vec<Named>,
    pub floors: Vec<Named>,
    pub entities: Vec<Entity>,
}

#[derive(Debug, Clone, Default)]
pub struct Named {
    pub name: String,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Entity {
    pub name: String,
    pub aliases: Vec<String>,
    /// `domain` and `device_class`, say.
    pub context: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct FixturesFile {
    #[serde(default)]
    areas: Vec<FixtureNamed>,
    #[serde(default)]
    floors: Vec<FixtureNamed>,
    #[serde(default)]
    entities: Vec<FixtureEntity>,
}

#[derive(Deserialize)]
struct FixtureNamed {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
}

#[derive(Deserialize)]
struct FixtureEntity {
    name: String,
    /// `light.kitchen`: the domain is before the dot.
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    attributes: BTreeMap<String, Value>,
}

impl Home {
    /// Adds the values of slot `slot` the home does not have yet: areas
    /// for `area`, floors for `floor`, entities (of no known domain) for
    /// `name`; other slots add nothing.
    pub fn add_names(&mut self, slot: &str, values: &[String]) {
        fn has<'a>(mut names: impl Iterator<Item = &'a String>, v: &str) -> bool {
            names.any(|n| n.eq_ignore_ascii_case(v))
        }
        let named = |v: &String| Named {
            name: v.clone(),
            aliases: Vec::new(),
        };
        for v in values {
            match slot {
                "area" if !has(self.areas.iter().map(|a| &a.name), v) => self.areas.push(named(v)),
                "floor" if !has(self.floors.iter().map(|f| &f.name), v) => {
                    self.floors.push(named(v))
                }
                "name" if !has(self.entities.iter().map(|e| &e.name), v) => {
                    self.entities.push(Entity {
                        name: v.clone(),
                        ..Entity::default()
                    })
                }
                _ => {}
            }
        }
    }

    /// A home in Home Assistant's test-fixture form (YAML with `areas`,
    /// `floors` and `entities`; an entity's `id` gives its domain and its
    /// `attributes.device_class` its class).
    pub fn from_fixtures(yaml: &str) -> Result<Home, serde_norway::Error> {
        let f: FixturesFile = serde_norway::from_str(yaml)?;
        let named = |v: Vec<FixtureNamed>| {
            v.into_iter()
                .map(|n| Named {
                    name: n.name,
                    aliases: n.aliases,
                })
                .collect()
        };
        Ok(Home {
            areas: named(f.areas),
            floors: named(f.floors),
            entities: f
                .entities
                .into_iter()
                .map(|e| {
                    let mut context = BTreeMap::new();
                    if let Some((domain, _)) = e.id.split_once('.') {
                        context.insert("domain".to_owned(), domain.to_owned());
                    }
                    if let Some(Value::String(class)) = e.attributes.get("device_class") {
                        context.insert("device_class".to_owned(), class.clone());
                    }
                    Entity {
                        name: e.name,
                        aliases: e.aliases,
                        context,
                    }
                })
                .collect(),
        })
    }
}
