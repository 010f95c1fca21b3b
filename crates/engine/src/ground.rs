//! Grounding: bringing generated slots in line with what the input says.
//!
//! A 135M model copies its examples' values too readily ("First Floor" for
//! "turn off the kitchen lights") and misses names it was never shown; the
//! input is the better witness. Grounding links the input to the known
//! values of the intent's enum slots (the home's areas and entity names)
//! and trusts those links over the reply:
//!
//! - A *mention* is a known enum value said in the input on word
//!   boundaries, ignoring case. Only the longest mentions count: in "the
//!   office thermostat", entity "Office Thermostat" is meant, not area
//!   "Office".
//! - A slot with exactly one mention takes it when the reply left the slot
//!   out, gave a value that is nowhere in the input, gave a part of the
//!   mention, or gave the mention wrapped in *command words* ("activate
//!   stealth mode" is "Stealth Mode"; see [`Grounding::command_words`]).
//!   Open enums do so only when their values are *said* (see
//!   [`Grounding::inferred`]): a `domain` such as `light` is inferred, and
//!   the word "light" in the input does not make it one.
//! - A text value is dropped when it lies inside another slot's mention
//!   (longer, or a closed enum's: "kitchen" in "pause the kitchen timer" is
//!   the area, not the timer's name), and when it is nowhere in the input,
//!   unless its slot is inferred and the value is one of its known values.
//!   An inferred open enum keeps only its known values: a value it lacks is
//!   the model copying input words into a category ("stealth_mode").
//! - Said text values lose *carrier words* at either end ("timer" in
//!   "pizza timer"; see [`Grounding::carriers`]).
//! - A number is kept when the input says it, in digits or words ("one
//!   hundred percent" is 100). The words around a said number decide its
//!   slot when they can ([`NumberCues`]); a number placed in one slot is
//!   not also another slot's value or a name ("pause 1 hour timer" gives
//!   `start_hours: 1`, not `name: "1"`).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use super::number_slots::{overlap, NumberCues};
use super::schema::{add_value, find_span, find_word, Slot, SlotKind, SlotSpec, SlotValue, Span};
use slmd_core::examples::{slot_text, slot_values_match, Example};

/// A slot is said when at least this share of its example values can be
/// found in their example's text.
const SAID_SHARE: f64 = 0.75;

/// An intent is read without the model only when at least this many
/// annotated examples show that grounding gives their slots
/// ([`Grounding::reads_all`]).
const READ_EXAMPLES: usize = 2;

/// A carrier word is outside slot values in at least this many examples.
const CARRIER_EXAMPLES: usize = 2;

/// What a task's annotated examples teach about its slots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grounding {
    /// Slots whose values are inferred rather than said: fewer than
    /// [`SAID_SHARE`] of the values the examples give them are found in
    /// their text (a `domain` such as `binary_sensor`). A slot no example
    /// fills is taken as said.
    pub inferred: BTreeSet<String>,
    /// Carrier words, lower case: words of the examples that are never part
    /// of a slot value and are outside one in at least two examples ("timer"
    /// in "pause the pizza timer"). A value does not begin or end with one.
    pub carriers: BTreeSet<String>,
    /// Words of the examples that are never part of a slot value, nor of a
    /// known value: what commands are made of ("activate", "brightness").
    pub command_words: BTreeSet<String>,
    /// Which words around a said number point to which number slot.
    pub numbers: NumberCues,
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl Grounding {
    /// Learns from `examples` (those with slots) about `slots`.
    pub fn learn(slots: &[SlotSpec], examples: &[Example]) -> Grounding {
        let annotated: Vec<(&str, Vec<String>)> = examples
            .iter()
            .filter_map(|ex| {
                let given = ex.slots.as_ref()?;
                Some((
                    ex.text.as_str(),
                    given.values().filter_map(slot_text).collect(),
                ))
            })
            .collect();
        let inferred = slots
            .iter()
            .filter(|spec| {
                let (mut given, mut found) = (0usize, 0usize);
                for ex in examples {
                    let Some(text) = ex
                        .slots
                        .as_ref()
                        .and_then(|m| m.get(&spec.name))
                        .and_then(slot_text)
                    else {
                        continue;
                    };
                    if text.parse::<f64>().is_ok() {
                        continue;
                    }
                    given += 1;
                    found += usize::from(find_span(&ex.text, &SlotValue::Text(text)).is_some());
                }
                given > 0 && (found as f64) < SAID_SHARE * given as f64
            })
            .map(|spec| spec.name.clone())
            .collect();
        let inside: BTreeSet<String> = annotated
            .iter()
            .flat_map(|(_, values)| values.iter().flat_map(|v| words(v)))
            .collect();
        let mut outside: HashMap<String, usize> = HashMap::new();
        for (text, _) in &annotated {
            let distinct: BTreeSet<String> = words(text).collect();
            for w in distinct {
                *outside.entry(w).or_default() += 1;
            }
        }
        let carriers = outside
            .into_iter()
            .filter(|(w, n)| *n >= CARRIER_EXAMPLES && !inside.contains(w))
            .map(|(w, _)| w)
            .collect();
        let valued: BTreeSet<String> = slots
            .iter()
            .filter_map(|spec| match &spec.kind {
                SlotKind::Enum { values, .. } => Some(values),
                _ => None,
            })
            .flatten()
            .flat_map(|v| words(v))
            .collect();
        let command_words = examples
            .iter()
            .flat_map(|ex| words(&ex.text))
            .filter(|w| !inside.contains(w) && !valued.contains(w))
            .collect();
        Grounding {
            inferred,
            carriers,
            command_words,
            numbers: NumberCues::learn(slots, examples),
        }
    }

    fn said(&self, slot: &str) -> bool {
        !self.inferred.contains(slot)
    }

    /// `value` without carrier words at either end; `None` when nothing
    /// else is left.
    fn trim<'v>(&self, value: &'v str) -> Option<&'v str> {
        let is_carrier = |w: &str| self.carriers.contains(&w.to_lowercase());
        let mut v = value.trim();
        while let Some((first, rest)) = v.split_once(' ') {
            if !is_carrier(first) {
                break;
            }
            v = rest.trim_start();
        }
        while let Some((rest, last)) = v.rsplit_once(' ') {
            if !is_carrier(last) {
                break;
            }
            v = rest.trim_end();
        }
        (!v.is_empty() && !is_carrier(v)).then_some(v)
    }
}

/// `slots` with each open enum's known values joined by the values the
/// annotated `examples` give it (so a timer name seen in one intent's
/// examples is known to all), in first-seen order.
pub fn with_example_values(slots: &[SlotSpec], examples: &[Example]) -> Vec<SlotSpec> {
    slots
        .iter()
        .map(|spec| {
            let mut spec = spec.clone();
            if let SlotKind::Enum { values, open: true } = &mut spec.kind {
                let given = examples
                    .iter()
                    .filter_map(|ex| ex.slots.as_ref()?.get(&spec.name).and_then(slot_text));
                for v in given.filter(|v| v.parse::<f64>().is_err()) {
                    add_value(values, &v);
                }
            }
            spec
        })
        .collect()
}

/// A known value of slot `slot` said at `start..end` of the input.
#[derive(Debug, Clone)]
struct Mention {
    slot: usize,
    value: String,
    start: usize,
    end: usize,
}

impl Mention {
    fn covers(&self, span: &Span) -> bool {
        self.start <= span.start && span.end <= self.end
    }

    fn is(&self, span: &Span) -> bool {
        self.start == span.start && span.end == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// `slots` with `values` taken out of their open enums.
fn without_open_values(slots: &[SlotSpec], values: &[&str]) -> Vec<SlotSpec> {
    slots
        .iter()
        .map(|spec| match &spec.kind {
            SlotKind::Enum {
                values: known,
                open: true,
            } => SlotSpec {
                name: spec.name.clone(),
                kind: SlotKind::Enum {
                    values: known
                        .iter()
                        .filter(|k| !values.iter().any(|v| v.eq_ignore_ascii_case(k)))
                        .cloned()
                        .collect(),
                    open: true,
                },
            },
            _ => spec.clone(),
        })
        .collect()
}

/// Whether `value` is one of `spec`'s enum values, ignoring ASCII case.
fn known_value(spec: &SlotSpec, value: &SlotValue) -> bool {
    match (&spec.kind, value) {
        (SlotKind::Enum { values, .. }, SlotValue::Text(v)) => {
            values.iter().any(|x| x.eq_ignore_ascii_case(v))
        }
        _ => false,
    }
}

fn closed(spec: &SlotSpec) -> bool {
    matches!(spec.kind, SlotKind::Enum { open: false, .. })
}

/// The longest mentions of `slots`' enum values in `input`: a mention
/// inside a longer one (of any slot) is not one.
fn mentions(slots: &[SlotSpec], input: &str) -> Vec<Mention> {
    let mut all = Vec::new();
    for (slot, spec) in slots.iter().enumerate() {
        let SlotKind::Enum { values, .. } = &spec.kind else {
            continue;
        };
        for value in values {
            if let Some((start, end)) = find_word(input, value) {
                all.push(Mention {
                    slot,
                    value: value.clone(),
                    start,
                    end,
                });
            }
        }
    }
    let longest = |m: &Mention| {
        !all.iter()
            .any(|o| o.start <= m.start && m.end <= o.end && o.len() > m.len())
    };
    all.iter().filter(|m| longest(m)).cloned().collect()
}

impl Grounding {
    /// Whether grounding alone, with no reply from the model, gives every
    /// one of `examples` exactly its annotated slots. Such an intent is not
    /// generated for: the model would add nothing its examples show.
    ///
    /// Each example is read as a new sentence would be: `slots` are the
    /// intent's slots with their declared values, and an open enum's values
    /// that only this example gives are left out (an open list is never
    /// complete, so a new sentence may name something it lacks).
    pub fn reads_all(&self, slots: &[SlotSpec], examples: &[&Example]) -> bool {
        examples.len() >= READ_EXAMPLES
            && examples.iter().enumerate().all(|(i, ex)| {
                let others = examples
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, e)| *e);
                self.reads_as_new(slots, ex, others)
            })
    }

    /// Whether grounding alone gives `ex` exactly its annotated slots when
    /// the open enums' values that no example of `others` gives are unknown.
    fn reads_as_new<'e>(
        &self,
        slots: &[SlotSpec],
        ex: &Example,
        others: impl Iterator<Item = &'e Example>,
    ) -> bool {
        let Some(given) = &ex.slots else { return false };
        let given: Vec<(&String, String)> = given
            .iter()
            .filter_map(|(k, v)| Some((k, slot_text(v)?)))
            .collect();
        let others: Vec<String> = others
            .flat_map(|e| e.slots.iter().flatten().filter_map(|(_, v)| slot_text(v)))
            .collect();
        let own: Vec<&str> = given
            .iter()
            .map(|(_, v)| v.as_str())
            .filter(|v| !others.iter().any(|o| o.eq_ignore_ascii_case(v)))
            .collect();
        let mut found = Vec::new();
        self.ground(&without_open_values(slots, &own), &mut found, &ex.text);
        found.len() == given.len()
            && given.iter().all(|(name, want)| {
                found
                    .iter()
                    .any(|s| &&s.name == name && slot_values_match(&s.value.to_string(), want))
            })
    }

    /// Brings `found` (parsed from the reply to `input`, for an intent
    /// that may fill `slots`) in line with the input, as the module
    /// describes. The result is in schema order.
    pub fn ground(&self, slots: &[SlotSpec], found: &mut Vec<Slot>, input: &str) {
        self.trim_carriers(slots, found, input);
        let said = super::numbers::said_numbers(input);
        for slot in found.iter_mut() {
            if let (SlotValue::Number(x), None) = (&slot.value, &slot.span) {
                slot.span = said
                    .iter()
                    .find(|(v, _)| v == x)
                    .map(|(_, r)| Span::of(input, r.start, r.end));
            }
        }
        let mentions = mentions(slots, input);
        let names: Vec<Range<usize>> = mentions.iter().map(|m| m.start..m.end).collect();
        let placed = self.numbers.place(slots, input, &said, &names);
        for p in &placed {
            let slot = Slot {
                name: p.slot.clone(),
                value: SlotValue::Number(p.value),
                span: Some(Span::of(input, p.range.start, p.range.end)),
            };
            match found.iter_mut().find(|s| s.name == p.slot) {
                Some(s) => *s = slot,
                None => found.push(slot),
            }
        }
        // A placed number is no other slot's value.
        found.retain(|s| {
            let Some(span) = &s.span else { return true };
            let span = span.start..span.end;
            !placed
                .iter()
                .any(|p| p.slot != s.name && overlap(&p.range, &span))
        });
        let mut claimed: Vec<&Mention> = Vec::new();
        for (i, spec) in slots.iter().enumerate() {
            let own: Vec<&Mention> = mentions.iter().filter(|m| m.slot == i).collect();
            let [m] = own[..] else {
                continue;
            };
            if !closed(spec) && !self.said(&spec.name) {
                continue;
            }
            let slot = Slot {
                name: spec.name.clone(),
                value: SlotValue::Text(m.value.clone()),
                span: Some(Span::of(input, m.start, m.end)),
            };
            // A reply that wraps the mention in command words ("activate
            // stealth mode") meant the known value.
            let widened = |s: &Slot| {
                !known_value(spec, &s.value)
                    && s.span.as_ref().is_some_and(|span| {
                        span.start <= m.start
                            && m.end <= span.end
                            && words(&input[span.start..m.start])
                                .chain(words(&input[m.end..span.end]))
                                .all(|w| self.command_words.contains(&w))
                    })
            };
            match found.iter_mut().find(|s| s.name == spec.name) {
                Some(s) if s.span.as_ref().is_none_or(|span| m.covers(span)) || widened(s) => {
                    *s = slot;
                    claimed.push(m);
                }
                Some(s) => {
                    if s.span.as_ref().is_some_and(|span| m.is(span)) {
                        claimed.push(m);
                    }
                }
                None => {
                    found.push(slot);
                    claimed.push(m);
                }
            }
        }
        found.retain(|slot| {
            let Some(i) = slots.iter().position(|s| s.name == slot.name) else {
                return false;
            };
            // An inferred slot names a category, and only a known one: a
            // value its open list lacks is the model copying words of the
            // input ("stealth_mode"). A category need not be said.
            let category = !self.said(&slot.name)
                && matches!(&slots[i].kind, SlotKind::Enum { open: true, .. });
            if category && !known_value(&slots[i], &slot.value) {
                return false;
            }
            match &slot.span {
                Some(span) => !claimed.iter().any(|m| {
                    m.slot != i
                        && m.covers(span)
                        && (m.len() > span.end - span.start || closed(&slots[m.slot]))
                }),
                None => category,
            }
        });
        found.sort_by_key(|s| slots.iter().position(|spec| spec.name == s.name));
    }

    /// Said text values lose carrier words at either end (and are dropped
    /// when nothing else is left); known values are left as they are.
    fn trim_carriers(&self, slots: &[SlotSpec], found: &mut Vec<Slot>, input: &str) {
        found.retain_mut(|slot| {
            let SlotValue::Text(value) = &slot.value else {
                return true;
            };
            let spec = slots.iter().find(|s| s.name == slot.name);
            let known = match spec.map(|s| &s.kind) {
                Some(SlotKind::Enum { values, .. }) => values.contains(value),
                _ => false,
            };
            if known || !self.said(&slot.name) {
                return true;
            }
            let Some(trimmed) = self.trim(value) else {
                return false;
            };
            if trimmed != value {
                let value = SlotValue::Text(trimmed.to_string());
                slot.span = find_span(input, &value);
                slot.value = value;
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::parse_output;

    fn spec(name: &str, values: &[&str], open: bool) -> SlotSpec {
        SlotSpec {
            name: name.to_string(),
            kind: SlotKind::Enum {
                values: values.iter().map(|v| v.to_string()).collect(),
                open,
            },
        }
    }

    fn text(name: &str) -> SlotSpec {
        SlotSpec {
            name: name.to_string(),
            kind: SlotKind::String,
        }
    }

    /// Grounds `reply` to `input`; (slot, value, raw span) in schema order.
    fn grounded(
        slots: &[SlotSpec],
        g: &Grounding,
        input: &str,
        reply: &str,
    ) -> Vec<(String, String, Option<String>)> {
        let mut got = parse_output(slots, reply, input).unwrap();
        g.ground(slots, &mut got, input);
        got.into_iter()
            .map(|s| (s.name, s.value.to_string(), s.span.map(|s| s.raw)))
            .collect()
    }

    fn slot(name: &str, value: &str, raw: Option<&str>) -> (String, String, Option<String>) {
        (name.into(), value.into(), raw.map(str::to_owned))
    }

    /// Each case: input, reply, the grounded slots, why.
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(String, String, Option<String>)>,
        &'a str,
    );

    fn check(slots: &[SlotSpec], g: &Grounding, cases: Vec<Case<'_>>) {
        for (input, reply, want, why) in cases {
            assert_eq!(grounded(slots, g, input, reply), want, "{input}: {why}");
        }
    }

    #[test]
    fn a_closed_enum_takes_the_one_value_the_input_names() {
        let slots = vec![
            spec("area", &["Kitchen", "Living Room"], false),
            spec("floor", &["First Floor", "Basement"], false),
            text("domain"),
        ];
        let kitchen = || vec![slot("area", "Kitchen", Some("kitchen"))];
        check(
            &slots,
            &Grounding::default(),
            vec![
                (
                    "turn off the kitchen lights",
                    r#"{"floor": "First Floor"}"#,
                    kitchen(),
                    "area added; the floor nothing names is dropped",
                ),
                (
                    "pause music in the living room",
                    r#"{"area": "Kitchen"}"#,
                    vec![slot("area", "Living Room", Some("living room"))],
                    "replaced",
                ),
                (
                    "kitchen and living room",
                    r#"{"area": "Kitchen"}"#,
                    kitchen(),
                    "two named: left to the model",
                ),
            ],
        );
    }

    #[test]
    fn the_longest_mention_wins_across_slots() {
        let slots = vec![
            spec("name", &["Office Thermostat", "TV", "Light"], true),
            spec("area", &["Office", "Kitchen"], false),
            text("item"),
        ];
        check(
            &slots,
            &Grounding::default(),
            vec![
                (
                    "what's the office thermostat temperature?",
                    r#"{"area": "Office"}"#,
                    vec![slot("name", "Office Thermostat", Some("office thermostat"))],
                    "the entity is meant, not the area inside its name",
                ),
                (
                    "pause the TV",
                    "{}",
                    vec![slot("name", "TV", Some("TV"))],
                    "a said open enum takes a known value the reply missed",
                ),
                (
                    "pause the kitchen timer",
                    r#"{"name": "kitchen"}"#,
                    vec![slot("area", "Kitchen", Some("kitchen"))],
                    "a word claimed by a closed enum is not also a name",
                ),
                (
                    "set Overhead Light to red",
                    r#"{"name": "Overhead Light"}"#,
                    vec![slot("name", "Overhead Light", Some("Overhead Light"))],
                    "a reply longer than the known value it contains stands",
                ),
            ],
        );
    }

    #[test]
    fn inferred_slots_keep_known_values_and_are_not_filled_from_words() {
        let slots = vec![
            spec("name", &["Bedroom Lamp", "Light"], true),
            spec("domain", &["binary_sensor", "light"], true),
            text("item"),
            SlotSpec {
                name: "level".into(),
                kind: SlotKind::Number,
            },
        ];
        let said = Grounding {
            inferred: ["domain".to_string()].into(),
            ..Default::default()
        };
        check(
            &slots,
            &said,
            vec![
                (
                    "is light detected at one hundred percent",
                    r#"{"name": "Tower Lights", "domain": "binary_sensor", "item": "milk", "level": 100}"#,
                    vec![
                        slot("name", "Light", Some("light")),
                        slot("domain", "binary_sensor", None),
                        slot("level", "100", Some("one hundred")),
                    ],
                    "unsaid text dropped; the inferred domain kept and not taken from the word",
                ),
                (
                    "turn up the volume",
                    r#"{"name": "Bedroom Lamp"}"#,
                    vec![],
                    "a said slot's known value must be said",
                ),
                (
                    "stealth mode on",
                    r#"{"domain": "stealth_mode"}"#,
                    vec![],
                    "a category the list lacks is dropped, though the input says it",
                ),
            ],
        );
    }

    #[test]
    fn a_known_name_wrapped_in_command_words_is_the_name() {
        let slots = vec![spec(
            "name",
            &["Stealth Mode", "Bedroom Lamp", "Light"],
            true,
        )];
        let g = Grounding {
            command_words: ["activate".to_string(), "brightness".to_string()].into(),
            ..Default::default()
        };
        check(
            &slots,
            &g,
            vec![
                (
                    "activate stealth mode",
                    r#"{"name": "Activate Stealth Mode"}"#,
                    vec![slot("name", "Stealth Mode", Some("stealth mode"))],
                    "a command word before the name",
                ),
                (
                    "brightness bedroom lamp 50%",
                    r#"{"name": "Brightness Bedroom Lamp"}"#,
                    vec![slot("name", "Bedroom Lamp", Some("bedroom lamp"))],
                    "a command word before the name",
                ),
                (
                    "set overhead light to red",
                    r#"{"name": "Overhead Light"}"#,
                    vec![slot("name", "Overhead Light", Some("overhead light"))],
                    "a word that is not a command word may be part of a new name",
                ),
            ],
        );
    }

    #[test]
    fn an_intent_is_read_without_the_model_only_when_its_examples_show_it_can_be() {
        let slots = vec![
            spec("area", &["Kitchen", "Living Room"], false),
            spec("name", &["TV", "Radio"], true),
            SlotSpec {
                name: "volume".into(),
                kind: SlotKind::Number,
            },
        ];
        let ex = |text: &str, slots: serde_json::Value| Example {
            text: text.into(),
            label: "x".into(),
            slots: slots.as_object().cloned(),
        };
        let said = [
            ex("pause the TV", serde_json::json!({"name": "TV"})),
            ex(
                "kitchen volume to 30",
                serde_json::json!({"area": "Kitchen", "volume": 30}),
            ),
            ex(
                "TV volume 20",
                serde_json::json!({"name": "TV", "volume": 20}),
            ),
        ];
        let g = Grounding::learn(&slots, &said);
        let read = |examples: &[&Example]| g.reads_all(&slots, examples);
        assert!(
            read(&[&said[0], &said[1], &said[2]]),
            "mentions and numbers give every slot"
        );
        assert!(!read(&[&said[0]]), "one example is too few to tell");
        let radio = ex("pause the radio", serde_json::json!({"name": "Radio"}));
        assert!(
            !read(&[&said[0], &said[1], &radio]),
            "an open value only one example names may be new to the next sentence"
        );
        let free = ex("pause the stereo", serde_json::json!({"name": "stereo"}));
        assert!(
            !read(&[&said[0], &free]),
            "a name no value covers needs the model"
        );
        let unsaid = ex(
            "skip this track",
            serde_json::json!({"area": "Living Room"}),
        );
        assert!(
            !read(&[&said[0], &unsaid]),
            "a value not in the text needs the model"
        );
        let bare = Example {
            slots: None,
            ..said[0].clone()
        };
        assert!(
            !read(&[&said[0], &bare]),
            "unannotated examples show nothing"
        );
    }

    #[test]
    fn examples_teach_inferred_slots_carrier_words_and_values() {
        let slots = vec![spec("name", &["TV"], true), spec("domain", &[], true)];
        let ex = |text: &str, name: &str, domain: &str| Example {
            text: text.into(),
            label: "x".into(),
            slots: Some(
                [("name", name), ("domain", domain)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect(),
            ),
        };
        let examples = [
            ex("is the pet door open", "Pet Door", "binary_sensor"),
            ex("turn on the tv", "tv", "media_player"),
            ex("open main valve", "Main Valve", "valve"),
        ];
        let g = Grounding::learn(&slots, &examples);
        assert_eq!(g.inferred, ["domain".to_string()].into());
        assert_eq!(
            g.carriers,
            ["open".to_string(), "the".to_string()].into(),
            "outside values in two examples and never inside one"
        );
        assert_eq!(
            g.command_words,
            ["is", "on", "open", "the", "turn"].map(String::from).into(),
            "outside every value, given or known"
        );
        let widened = with_example_values(&slots, &examples);
        assert_eq!(
            widened[0].kind,
            SlotKind::Enum {
                values: vec!["TV".into(), "Pet Door".into(), "Main Valve".into()],
                open: true
            }
        );
    }

    #[test]
    fn carrier_words_are_trimmed_and_numbers_must_be_said() {
        let slots = vec![
            text("name"),
            SlotSpec {
                name: "level".into(),
                kind: SlotKind::Number,
            },
        ];
        let g = Grounding {
            carriers: ["timer".to_string(), "the".to_string()].into(),
            ..Default::default()
        };
        check(
            &slots,
            &g,
            vec![
                (
                    "pause the pizza timer",
                    r#"{"name": "the pizza timer"}"#,
                    vec![slot("name", "pizza", Some("pizza"))],
                    "carrier words trimmed",
                ),
                (
                    "resume the timer",
                    r#"{"name": "timer", "level": 1}"#,
                    vec![],
                    "nothing but a carrier word, and a number the input does not say",
                ),
                (
                    "set it to one hundred percent",
                    r#"{"level": 100}"#,
                    vec![slot("level", "100", Some("one hundred"))],
                    "a number said in words",
                ),
            ],
        );
    }

    #[test]
    fn the_words_around_numbers_place_them_and_a_placed_number_is_nothing_else() {
        let number = |name: &str| SlotSpec {
            name: name.into(),
            kind: SlotKind::Number,
        };
        let slots = vec![text("name"), number("minutes"), number("start_hours")];
        let examples = [Example {
            text: "pause 1 hour timer".into(),
            label: "x".into(),
            slots: Some(
                [("start_hours".to_string(), serde_json::json!(1))]
                    .into_iter()
                    .collect(),
            ),
        }];
        let g = Grounding::learn(&slots, &examples);
        check(
            &slots,
            &g,
            vec![
                (
                    "add 5 minutes to 1 hour timer",
                    r#"{"name": "1", "minutes": 1}"#,
                    vec![
                        slot("minutes", "5", Some("5")),
                        slot("start_hours", "1", Some("1")),
                    ],
                    "numbers moved to the slots their units point to; '1' is not a name",
                ),
                (
                    "add 5 to the timer",
                    r#"{"minutes": 5}"#,
                    vec![slot("minutes", "5", Some("5"))],
                    "no unit: the model's choice stands",
                ),
            ],
        );
    }
}
