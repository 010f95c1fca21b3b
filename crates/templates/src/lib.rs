//! The template stage: Home Assistant's sentence templates, matched
//! without a model.
//!
//! The home-assistant/intents project describes, per language, how people
//! phrase smart-home commands, in hassil's template language
//! ([`syntax`]): `<turn> on [the] {area} <light>`. [`Templates`] compiles a
//! language's intents, lists and expansion rules, together with a home's
//! areas, floors and entities ([`Home`]), and [`Templates::recognise`]
//! answers an input that one of the sentences matches exactly (after
//! [`normal::normalise`] and the language's skip words) with its intent and
//! slots. An input no sentence matches is for the model.
//!
//! When several sentences match, the one that leaves least to wildcards
//! and matches most literal text wins, then the one listed first.

mod data;
pub mod matcher;
pub mod normal;
mod sample;
pub mod syntax;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

pub use data::{Entity, Home, Named};
use data::{IntentsFile, ListFile, RangeFile, ValueFile};
pub use sample::Sample;
use syntax::Expr;

/// Everything that can be wrong with templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {template:?}, at character {at}: {why}")]
    Syntax {
        template: String,
        at: usize,
        why: String,
    },
    #[error("intent {intent}: sentence {sentence:?} uses <{rule}>, which is not defined")]
    UnknownRule {
        intent: String,
        sentence: String,
        rule: String,
    },
    #[error("expansion rule <{0}> refers to itself")]
    RecursiveRule(String),
    #[error("intent {intent}: sentence {sentence:?} expands to more than {MAX_NODES} parts")]
    TooLarge { intent: String, sentence: String },
    #[error("intent {intent}: sentence {sentence:?} uses list {{{list}}}, which is not defined")]
    UnknownList {
        intent: String,
        sentence: String,
        list: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an intents file: {why}")]
    Format { path: String, why: String },
}

/// The most parts one sentence may expand to (its rules inlined): a bound
/// on memory and on the walk whatever the templates.
const MAX_NODES: usize = 100_000;

/// The lists a home fills; sentences may name them without defining them.
const HOME_LISTS: [&str; 3] = ["area", "floor", "name"];

/// A compiled template, rules resolved and lists numbered.
#[derive(Debug, Clone)]
enum Node {
    Text(Vec<char>),
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    List { list: usize, slot: String },
}

#[derive(Debug)]
enum List {
    Values(Vec<Item>),
    Range(RangeFile),
    Wildcard,
}

#[derive(Debug)]
struct Item {
    node: Node,
    /// The slot's value; the matched words when `None`.
    out: Option<Value>,
    context: Vec<(String, String)>,
}

/// What a block of sentences needs of the context.
#[derive(Debug)]
enum Want {
    /// Any value.
    Any,
    OneOf(Vec<String>),
    /// Any value (or one of these), which also fills the slot of that name.
    Slot(Option<Vec<String>>),
}

#[derive(Debug)]
struct Block {
    intent: String,
    slots: Vec<(String, Value)>,
    requires: Vec<(String, Want)>,
    excludes: Vec<(String, Want)>,
}

#[derive(Debug)]
struct Sentence {
    node: Node,
    block: usize,
}

/// A language's intents, compiled with a home.
#[derive(Debug)]
pub struct Templates {
    pub language: String,
    skip_words: Vec<String>,
    sentences: Vec<Sentence>,
    blocks: Vec<Block>,
    lists: Vec<List>,
}

/// A recognised input.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub intent: String,
    /// Slot names and values, fixed ones first, each name once.
    pub slots: Vec<(String, Value)>,
}

/// Intent files merged in order: a later file adds sentences to an intent
/// and replaces lists and rules of the same name.
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<IntentsFile>,
}

impl Sources {
    /// Adds an intents file: JSON as the `home-assistant-intents` package
    /// ships a language, or YAML as users write custom sentences; a
    /// directory adds each `*.yaml`, `*.yml` and `*.json` in it, by name.
    pub fn add_path(&mut self, path: &Path) -> Result<(), TemplateError> {
        let read_err = |source| TemplateError::Read {
            path: path.display().to_string(),
            source,
        };
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            files.sort();
            return files.iter().try_for_each(|f| self.add_path(f));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let json = path.extension().is_some_and(|x| x == "json");
        self.add_text(&text, json)
            .map_err(|why| TemplateError::Format {
                path: path.display().to_string(),
                why,
            })
    }

    /// Adds an intents file's text.
    pub fn add_text(&mut self, text: &str, json: bool) -> Result<(), String> {
        let file: IntentsFile = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            serde_norway::from_str(text).map_err(|e| e.to_string())?
        };
        self.files.push(file);
        Ok(())
    }

    /// Compiles every sentence with `home`'s areas, floors and entities.
    pub fn compile(&self, home: &Home) -> Result<Templates, TemplateError> {
        let mut rules: HashMap<&str, Expr> = HashMap::new();
        let mut list_files: HashMap<&str, &ListFile> = HashMap::new();
        let mut skip_words = Vec::new();
        let mut language = String::new();
        for f in &self.files {
            for (name, text) in &f.expansion_rules {
                rules.insert(name, syntax::parse(text)?);
            }
            list_files.extend(f.lists.iter().map(|(n, l)| (n.as_str(), l)));
            skip_words.extend(f.skip_words.iter().map(|w| normal::normalise(w)));
            if !f.language.is_empty() {
                language = f.language.clone();
            }
        }
        let mut c = Compiler {
            rules,
            lists: Vec::new(),
            index: HashMap::new(),
            made: Default::default(),
        };
        c.add_home(home)?;
        let mut names: Vec<&str> = list_files.keys().copied().collect();
        names.sort();
        for name in names {
            c.add_list(name, list_files[name])?;
        }
        let (mut blocks, mut sentences) = (Vec::new(), Vec::new());
        for f in &self.files {
            for (intent, i) in &f.intents {
                for b in &i.data {
                    let mut local = c.scope();
                    for (name, text) in &b.expansion_rules {
                        local.rules.insert(name, syntax::parse(text)?);
                    }
                    for (name, l) in &b.lists {
                        local.add_list(name, l)?;
                    }
                    for s in &b.sentences {
                        let node = local.sentence(intent, s)?;
                        sentences.push(Sentence {
                            node,
                            block: blocks.len(),
                        });
                    }
                    c.lists = local.lists;
                    blocks.push(Block {
                        intent: intent.clone(),
                        slots: b
                            .slots
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        requires: wants(&b.requires_context),
                        excludes: wants(&b.excludes_context),
                    });
                }
            }
        }
        skip_words.sort_by_key(|w: &String| std::cmp::Reverse(w.len()));
        Ok(Templates {
            language,
            skip_words,
            sentences,
            blocks,
            lists: c.lists,
        })
    }
}

fn wants(map: &BTreeMap<String, Value>) -> Vec<(String, Want)> {
    let strings = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::Null => None,
            Value::Array(a) => Some(a.iter().map(value_text).collect()),
            v => Some(vec![value_text(v)]),
        }
    };
    map.iter()
        .map(|(k, v)| {
            let want = match v {
                Value::Object(o) if o.get("slot").is_some_and(|s| s == &Value::Bool(true)) => {
                    Want::Slot(o.get("value").and_then(strings))
                }
                v => strings(v).map_or(Want::Any, Want::OneOf),
            };
            (k.clone(), want)
        })
        .collect()
}

/// A JSON value as text: strings without quotes.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

struct Compiler<'f> {
    rules: HashMap<&'f str, Expr>,
    lists: Vec<List>,
    index: HashMap<String, usize>,
    /// Parts made for the sentence being compiled.
    made: std::cell::Cell<usize>,
}

impl<'f> Compiler<'f> {
    /// A copy for one block's own rules and lists (which it may shadow).
    fn scope(&mut self) -> Compiler<'f> {
        Compiler {
            rules: self.rules.clone(),
            lists: std::mem::take(&mut self.lists),
            index: self.index.clone(),
            made: Default::default(),
        }
    }

    fn add_home(&mut self, home: &Home) -> Result<(), TemplateError> {
        let named =
            |n: &Named, context: &BTreeMap<String, String>| -> Result<Vec<Item>, TemplateError> {
                std::iter::once(&n.name)
                    .chain(&n.aliases)
                    .map(|text| {
                        // A name is what it says; one written as a template
                        // ("Trader Joe[']s") is one, if it parses as one.
                        let expr =
                            syntax::parse(text).unwrap_or_else(|_| Expr::Text(normal::fold(text)));
                        self.made.set(0);
                        Ok(Item {
                            node: self.node(&expr, "", "", &mut Vec::new())?,
                            out: Some(Value::String(n.name.replace("[']", "'"))),
                            context: context
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        })
                    })
                    .collect()
            };
        let none = BTreeMap::new();
        let mut lists = Vec::new();
        for (name, items) in HOME_LISTS.iter().zip([&home.areas, &home.floors]) {
            let mut values = Vec::new();
            for n in items {
                values.extend(named(n, &none)?);
            }
            lists.push((name, values));
        }
        let mut entities = Vec::new();
        for e in &home.entities {
            let n = Named {
                name: e.name.clone(),
                aliases: e.aliases.clone(),
            };
            entities.extend(named(&n, &e.context)?);
        }
        lists.push((&HOME_LISTS[2], entities));
        for (name, values) in lists {
            self.index.insert((*name).to_owned(), self.lists.len());
            self.lists.push(List::Values(values));
        }
        Ok(())
    }

    fn add_list(&mut self, name: &str, l: &ListFile) -> Result<(), TemplateError> {
        let list = match l {
            ListFile::Wildcard { wildcard: true } => List::Wildcard,
            ListFile::Wildcard { wildcard: false } => List::Values(Vec::new()),
            ListFile::Range { range } => List::Range(range.clone()),
            ListFile::Values { values } => List::Values(
                values
                    .iter()
                    .map(|v| {
                        let (text, out, context) = match v {
                            ValueFile::Text(t) => (t, None, Vec::new()),
                            ValueFile::Full { text, out, context } => (
                                text,
                                out.clone(),
                                context
                                    .iter()
                                    .map(|(k, v)| (k.clone(), value_text(v)))
                                    .collect(),
                            ),
                        };
                        self.made.set(0);
                        Ok(Item {
                            node: self.node(&syntax::parse(text)?, name, text, &mut Vec::new())?,
                            out,
                            context,
                        })
                    })
                    .collect::<Result<_, TemplateError>>()?,
            ),
        };
        self.index.insert(name.to_owned(), self.lists.len());
        self.lists.push(list);
        Ok(())
    }

    fn sentence(&self, intent: &str, s: &str) -> Result<Node, TemplateError> {
        self.made.set(0);
        self.node(&syntax::parse(s)?, intent, s, &mut Vec::new())
    }

    /// Resolves rules (`stack`: the rules being expanded) and lists.
    fn node(
        &self,
        e: &Expr,
        intent: &str,
        sentence: &str,
        stack: &mut Vec<String>,
    ) -> Result<Node, TemplateError> {
        self.made.set(self.made.get() + 1);
        if self.made.get() > MAX_NODES {
            return Err(TemplateError::TooLarge {
                intent: intent.to_owned(),
                sentence: sentence.to_owned(),
            });
        }
        Ok(match e {
            Expr::Text(t) => Node::Text(t.chars().collect()),
            Expr::Seq(items) => Node::Seq(
                items
                    .iter()
                    .map(|i| self.node(i, intent, sentence, stack))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Alt(items) => Node::Alt(
                items
                    .iter()
                    .map(|i| self.node(i, intent, sentence, stack))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::List { list, slot } => Node::List {
                list: *self
                    .index
                    .get(list)
                    .ok_or_else(|| TemplateError::UnknownList {
                        intent: intent.to_owned(),
                        sentence: sentence.to_owned(),
                        list: list.clone(),
                    })?,
                slot: slot.clone(),
            },
            Expr::Rule(name) => {
                if stack.contains(name) {
                    return Err(TemplateError::RecursiveRule(name.clone()));
                }
                let rule =
                    self.rules
                        .get(name.as_str())
                        .ok_or_else(|| TemplateError::UnknownRule {
                            intent: intent.to_owned(),
                            sentence: sentence.to_owned(),
                            rule: name.clone(),
                        })?;
                stack.push(name.clone());
                let node = self.node(rule, intent, sentence, stack);
                stack.pop();
                node?
            }
        })
    }
}

impl Templates {
    /// The sentences compiled.
    pub fn len(&self) -> usize {
        self.sentences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty()
    }

    /// The intents the sentences name, sorted, each once.
    pub fn intents(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.blocks.iter().map(|b| b.intent.as_str()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The best sentence match for `text`, given what the speaker's
    /// situation says (`context`: the satellite's area, say); `None` when
    /// no sentence matches all of it.
    pub fn recognise(&self, text: &str, context: &BTreeMap<String, String>) -> Option<Match> {
        self.recognise_with(text, context, &Some)
    }

    /// [`Templates::recognise`] among the matches `accept` takes (and as
    /// it rewrites them): an intent filter that a better match of another
    /// intent does not hide.
    pub fn recognise_with(
        &self,
        text: &str,
        context: &BTreeMap<String, String>,
        accept: matcher::Accept<'_>,
    ) -> Option<Match> {
        let input = normal::normalise(text);
        if input.is_empty() || input.chars().count() > matcher::MAX_INPUT_CHARS {
            return None;
        }
        let total = std::cell::Cell::new(0);
        let stripped = self.strip_skip_words(&input);
        if stripped != input {
            if let Some(m) = matcher::best(self, &stripped, context, accept, &total) {
                return Some(m);
            }
        }
        matcher::best(self, &input, context, accept, &total)
    }

    /// `input` without the language's skip words ("please", "can you"),
    /// unless nothing would be left.
    fn strip_skip_words(&self, input: &str) -> String {
        let mut s = format!(" {input} ");
        for w in &self.skip_words {
            if w.is_empty() {
                continue;
            }
            let needle = format!(" {w} ");
            while let Some(i) = s.find(&needle) {
                s.replace_range(i..i + needle.len(), " ");
            }
        }
        let s = s.trim().to_owned();
        if s.is_empty() {
            input.to_owned()
        } else {
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTENTS: &str = r#"
language: en
skip_words: [please]
expansion_rules:
  the: "(the|my)"
  light: "(light|lights|lamp)"
lists:
  brightness: { range: { from: 0, to: 100 } }
  temperature: { range: { from: 0, to: 40, fractions: halves } }
  item: { wildcard: true }
  state: { values: [{ in: "(on|lit)", out: "on" }, { in: "off", out: "off" }] }
intents:
  HassTurnOn:
    data:
      - sentences: ["turn on [<the>] {area} <light>", "[<the>] {area} <light> on"]
        slots: { domain: light }
      - sentences: ["turn on [<the>] {name}"]
        requires_context: { domain: [switch, fan] }
      - sentences: ["<light> on [in here]"]
        slots: { domain: light }
        requires_context: { area: { slot: true } }
  HassLightSet:
    data:
      - sentences: ["set [<the>] {area} <light> to {brightness}[%| percent]"]
  HassClimateSetTemperature:
    data:
      - sentences: ["set [the] temperature to {temperature}[°]"]
  HassListAddItem:
    data:
      - sentences: ["add {item} to [<the>] {name} list"]
"#;

    fn templates() -> Templates {
        let mut s = Sources::default();
        s.add_text(INTENTS, false).unwrap();
        let home = Home {
            areas: vec![Named {
                name: "Living Room".into(),
                aliases: vec!["lounge".into()],
            }],
            floors: vec![],
            entities: [
                ("Ceiling Fan", "fan"),
                ("Chores", "todo"),
                ("Desk Lamp", "light"),
            ]
            .iter()
            .map(|(n, d)| Entity {
                name: (*n).into(),
                aliases: vec![],
                context: [("domain".to_owned(), (*d).to_owned())].into(),
            })
            .collect(),
        };
        s.compile(&home).unwrap()
    }

    fn recognise(text: &str) -> Option<(String, Vec<(String, String)>)> {
        recognise_in(text, &BTreeMap::new())
    }

    fn recognise_in(
        text: &str,
        context: &BTreeMap<String, String>,
    ) -> Option<(String, Vec<(String, String)>)> {
        templates().recognise(text, context).map(|m| {
            let slots = m
                .slots
                .iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect();
            (m.intent, slots)
        })
    }

    fn slots(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn sentences_match_with_their_lists_rules_and_fixed_slots() {
        let want = Some((
            "HassTurnOn".to_owned(),
            slots(&[("domain", "light"), ("area", "Living Room")]),
        ));
        assert_eq!(recognise("Turn on the living room lights, please!"), want);
        assert_eq!(recognise("the lounge lamp on"), want);
        assert_eq!(
            recognise("set my living room light to 40%"),
            Some((
                "HassLightSet".into(),
                slots(&[("area", "Living Room"), ("brightness", "40")])
            ))
        );
        assert_eq!(
            recognise("set temperature to 20.5°"),
            Some((
                "HassClimateSetTemperature".into(),
                slots(&[("temperature", "20.5")])
            ))
        );
        assert_eq!(recognise("set temperature to 20.3"), None, "halves only");
        assert_eq!(
            recognise("set the living room light to 140%"),
            None,
            "out of range"
        );
        assert_eq!(
            recognise("turn on the kitchen lights"),
            None,
            "no such area"
        );
    }

    #[test]
    fn an_entity_must_fit_the_context_its_sentence_requires() {
        assert_eq!(
            recognise("turn on the ceiling fan"),
            Some(("HassTurnOn".into(), slots(&[("name", "Ceiling Fan")])))
        );
        assert_eq!(
            recognise("turn on the desk lamp"),
            None,
            "a light, not a switch or fan"
        );
    }

    #[test]
    fn a_slot_can_come_from_the_speakers_context() {
        assert_eq!(recognise("lights on in here"), None);
        let here = [("area".to_owned(), "Living Room".to_owned())].into();
        assert_eq!(
            recognise_in("lights on in here", &here),
            Some((
                "HassTurnOn".into(),
                slots(&[("domain", "light"), ("area", "Living Room")])
            ))
        );
    }

    #[test]
    fn a_wildcard_takes_what_the_rest_of_the_sentence_leaves() {
        assert_eq!(
            recognise("add oat milk and eggs to my chores list"),
            Some((
                "HassListAddItem".into(),
                slots(&[("item", "oat milk and eggs"), ("name", "Chores")])
            ))
        );
    }

    #[test]
    fn samples_are_sentences_the_templates_match_with_the_same_answer() {
        let t = templates();
        let samples = t.sample(3, 7);
        assert!(samples.len() > 10, "{samples:?}");
        assert_eq!(samples, t.sample(3, 7), "reproducible");
        for s in &samples {
            let m = t
                .recognise(&s.text, &BTreeMap::new())
                .unwrap_or_else(|| panic!("{s:?} does not match"));
            assert_eq!(m.intent, s.intent, "{s:?}");
            for (k, v) in &s.slots {
                let got = m
                    .slots
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| value_text(v));
                assert_eq!(got, Some(value_text(v)), "{k} of {s:?}");
            }
        }
        // Never a sentence that needs the speaker's area, nor an entity
        // its sentence does not allow.
        assert!(samples.iter().all(|s| !s.text.contains("in here")));
        assert!(!samples.iter().any(|s| s.text.contains("desk lamp")));
    }

    #[test]
    fn undefined_rules_and_lists_are_named() {
        let mut s = Sources::default();
        s.add_text("intents: {X: {data: [{sentences: ['a <nope>']}]}}", false)
            .unwrap();
        let e = s.compile(&Home::default()).unwrap_err().to_string();
        assert!(e.contains("<nope>") && e.contains("X"), "{e}");
        let mut s = Sources::default();
        s.add_text("intents: {X: {data: [{sentences: ['a {nope}']}]}}", false)
            .unwrap();
        assert!(s
            .compile(&Home::default())
            .unwrap_err()
            .to_string()
            .contains("{nope}"));
        let mut s = Sources::default();
        s.add_text("expansion_rules: {a: 'x <b>', b: 'y <a>'}\nintents: {X: {data: [{sentences: ['<a>']}]}}", false)
            .unwrap();
        assert!(s
            .compile(&Home::default())
            .unwrap_err()
            .to_string()
            .contains("refers to itself"));
    }

    #[test]
    fn a_folder_of_custom_sentences_adds_to_the_shipped_ones() {
        let dir = std::env::temp_dir().join(format!("slmd-templates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("garden.yaml"),
            "language: en\nintents:\n  WaterGarden:\n    data:\n      - sentences: ['water the {zone}']\n\
             lists:\n  zone: {values: [{in: '(lawn|grass)', out: lawn}, roses]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not sentences").unwrap();
        let mut s = Sources::default();
        s.add_text(INTENTS, false).unwrap();
        s.add_path(&dir).unwrap();
        let t = s.compile(&Home::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let m = t.recognise("water the grass", &BTreeMap::new()).unwrap();
        assert_eq!(
            (m.intent.as_str(), m.slots),
            (
                "WaterGarden",
                vec![("zone".to_owned(), Value::from("lawn"))]
            )
        );
        assert!(t
            .recognise("set temperature to 20", &BTreeMap::new())
            .is_some());
    }

    #[test]
    fn words_do_not_run_together() {
        assert_eq!(recognise("turnon the living room lights"), None);
        assert_eq!(recognise("turn on theliving room lights"), None);
        assert_eq!(recognise("additional milk to my chores list"), None);
    }

    #[test]
    fn a_filter_finds_an_accepted_match_behind_a_better_one() {
        let t = templates();
        let only_set = |m: Match| (m.intent == "HassLightSet").then_some(m);
        let none = BTreeMap::new();
        assert_eq!(
            t.recognise_with("turn on the living room lights", &none, &only_set),
            None
        );
        let m = t.recognise_with("set the living room lights to 30%", &none, &only_set);
        assert_eq!(m.unwrap().intent, "HassLightSet");
    }

    #[test]
    fn a_name_that_is_no_template_is_taken_as_written() {
        let mut s = Sources::default();
        s.add_text(INTENTS, false).unwrap();
        let home = Home {
            entities: vec![Entity {
                name: "Desk {main} <3".into(),
                aliases: vec![],
                context: [("domain".to_owned(), "switch".to_owned())].into(),
            }],
            ..Home::default()
        };
        let t = s.compile(&home).unwrap();
        let m = t.recognise("turn on the desk {main} <3", &BTreeMap::new());
        assert_eq!(
            m.unwrap().slots,
            [("name".to_owned(), Value::from("Desk {main} <3"))]
        );
    }

    #[test]
    fn rules_that_double_at_each_level_are_refused() {
        let mut rules = String::from("expansion_rules:\n  r0: 'a'\n");
        for i in 1..30 {
            rules.push_str(&format!("  r{i}: '<r{}> <r{}>'\n", i - 1, i - 1));
        }
        rules.push_str("intents: {X: {data: [{sentences: ['<r29>']}]}}");
        let mut s = Sources::default();
        s.add_text(&rules, false).unwrap();
        let e = s.compile(&Home::default()).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    #[test]
    fn hostile_input_is_bounded() {
        let t = templates();
        let long = "add ".to_owned() + &"a ".repeat(2000) + "to chores list";
        assert_eq!(t.recognise(&long, &BTreeMap::new()), None);
        let many = "add ".to_owned() + &"to ".repeat(140) + "chores list";
        let started = std::time::Instant::now();
        let _ = t.recognise(&many, &BTreeMap::new());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
