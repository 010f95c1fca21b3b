//! Which said number fills which number slot.
//!
//! A 135M model often puts a said number in the wrong slot ("add 5 minutes
//! to the 1 hour timer" gave `minutes: 1`) or leaves it out. The words
//! around a number tell the slots apart, and the task's annotated examples
//! show which words go with which slot:
//!
//! - the *unit* right after it: an attached sign ("50%", "20.5°") or the
//!   next word ("5 minutes", "one hundred percent");
//! - the word *before* it ("brightness 50", "volume to 90");
//! - the word *after* the unit ("1 hour timer": the timer's length, not the
//!   time added).
//!
//! A slot takes a number only when the unit fits it: its examples show the
//! unit, or the unit is its name or part of it, so a slot no example fills
//! is still found ("30 seconds" fills `seconds`). Among the slots the unit
//! fits, each neighbouring word its examples show counts, and a slot named
//! exactly the unit comes before one that only contains it (`hours` before
//! `start_hours`, unless "timer" follows as in the examples). Units and
//! words are compared singular and lower case, `%` as "percent" and `°` as
//! "degree".
//!
//! A number goes to the slot it scores best with unless another free slot
//! ties with it (then the model's choice stands). When the intent has one
//! number slot and the input one number, they belong together whatever the
//! words. Numbers inside a known value ("Bedroom 2") are names, not
//! quantities.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::numbers::{said_numbers, separates};
use super::schema::{SlotKind, SlotSpec};
use slmd_core::examples::{slot_text, Example};

/// Score of a unit that fits the slot; without it a slot scores 0.
const UNIT: u32 = 4;
/// Score of each neighbouring word the slot's examples show.
const NEIGHBOUR: u32 = 2;
/// Score of a slot named exactly the unit: less than a neighbour.
const EXACT_NAME: u32 = 1;

/// The words around one said number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Around {
    unit: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

/// Per number slot: the units its name gives, and the words seen around
/// its values in the examples.
#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    /// The slot's name and its parts, as units (`start_hours`: "start",
    /// "hour").
    named: BTreeSet<String>,
    /// The whole name as a unit (`hours`: "hour").
    exact: Option<String>,
    units: BTreeSet<String>,
    before: BTreeSet<String>,
    after: BTreeSet<String>,
}

/// What the examples teach about the task's number slots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NumberCues {
    seen: BTreeMap<String, Seen>,
}

/// A number the input says and the slot it fills.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub slot: String,
    pub value: f64,
    pub range: Range<usize>,
}

/// A word as units and neighbours are compared: lower case, singular,
/// signs spelt out.
fn normal(word: &str) -> Option<String> {
    let w = word
        .trim_matches(|c: char| !c.is_alphanumeric() && c != '%' && c != '°')
        .to_lowercase();
    let w = match w.as_str() {
        "" => return None,
        "%" => "percent".to_string(),
        _ if w.starts_with('°') => "degree".to_string(),
        _ => w,
    };
    Some(match w.strip_suffix('s') {
        Some(stem) if stem.len() >= 3 && !stem.ends_with('s') => stem.to_string(),
        _ => w,
    })
}

/// The words around the number said at `range` of `text`.
fn around(text: &str, range: &Range<usize>) -> Around {
    let before = text[..range.start].split(separates).rev().find_map(normal);
    // A sign written onto the number ("50%", "20.5°c") is its unit.
    let said = &text[range.clone()];
    let sign: String = said
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
        .to_string();
    let mut rest = text[range.end..].split(separates).filter_map(normal);
    let (unit, after) = if sign.is_empty() || sign.len() == said.len() {
        (rest.next(), rest.next())
    } else {
        (normal(&sign), rest.next())
    };
    Around {
        unit,
        before,
        after,
    }
}

/// Whether two byte ranges share a byte.
pub fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

fn number_slots(slots: &[SlotSpec]) -> impl Iterator<Item = &SlotSpec> {
    slots.iter().filter(|s| matches!(s.kind, SlotKind::Number))
}

impl NumberCues {
    /// Learns the words around each number slot's values in `examples`.
    pub fn learn(slots: &[SlotSpec], examples: &[Example]) -> NumberCues {
        let mut seen: BTreeMap<String, Seen> = number_slots(slots)
            .map(|spec| {
                let s = Seen {
                    named: spec.name.split('_').filter_map(normal).collect(),
                    exact: normal(&spec.name),
                    ..Default::default()
                };
                (spec.name.clone(), s)
            })
            .collect();
        for ex in examples {
            let Some(given) = &ex.slots else { continue };
            let said = said_numbers(&ex.text);
            for spec in number_slots(slots) {
                let Some(value) = given
                    .get(&spec.name)
                    .and_then(slot_text)
                    .and_then(|t| t.parse::<f64>().ok())
                else {
                    continue;
                };
                let Some((_, range)) = said.iter().find(|(x, _)| *x == value) else {
                    continue;
                };
                let a = around(&ex.text, range);
                let s = seen.entry(spec.name.clone()).or_default();
                s.units.extend(a.unit);
                s.before.extend(a.before);
                s.after.extend(a.after);
            }
        }
        NumberCues { seen }
    }

    fn score(&self, slot: &str, a: &Around) -> u32 {
        let (Some(unit), Some(seen)) = (&a.unit, self.seen.get(slot)) else {
            return 0;
        };
        if !seen.named.contains(unit) && !seen.units.contains(unit) {
            return 0;
        }
        let shown = |words: &BTreeSet<String>, w: &Option<String>| match w {
            Some(w) if words.contains(w) => NEIGHBOUR,
            _ => 0,
        };
        let exact = if seen.exact.as_ref() == Some(unit) {
            EXACT_NAME
        } else {
            0
        };
        UNIT + shown(&seen.before, &a.before) + shown(&seen.after, &a.after) + exact
    }

    /// The numbers `said` in `input` (as [`said_numbers`] finds them)
    /// placed in the number slots of `slots`, each number and slot at most
    /// once, in input order. Numbers inside a range of `names` are not
    /// placed.
    pub fn place(
        &self,
        slots: &[SlotSpec],
        input: &str,
        said: &[(f64, Range<usize>)],
        names: &[Range<usize>],
    ) -> Vec<Placed> {
        let candidates: Vec<&SlotSpec> = number_slots(slots).collect();
        let numbers: Vec<&(f64, Range<usize>)> = said
            .iter()
            .filter(|(_, r)| !names.iter().any(|n| overlap(n, r)))
            .collect();
        if let ([slot], [(value, range)]) = (&candidates[..], &numbers[..]) {
            return vec![Placed {
                slot: slot.name.clone(),
                value: *value,
                range: range.clone(),
            }];
        }
        // (score, number, slot), best first.
        let mut pairs: Vec<(u32, usize, usize)> = Vec::new();
        for (n, (_, range)) in numbers.iter().enumerate() {
            let a = around(input, range);
            for (s, spec) in candidates.iter().enumerate() {
                let score = self.score(&spec.name, &a);
                if score > 0 {
                    pairs.push((score, n, s));
                }
            }
        }
        pairs.sort_by_key(|p| std::cmp::Reverse(p.0));
        let (mut numbers_used, mut slots_used) = (BTreeSet::new(), BTreeSet::new());
        let mut placed = Vec::new();
        for &(score, n, s) in &pairs {
            if numbers_used.contains(&n) || slots_used.contains(&s) {
                continue;
            }
            // A tie between free slots for this number: the words do not
            // decide, the model does.
            let tied = pairs
                .iter()
                .any(|&(o, m, t)| o == score && m == n && t != s && !slots_used.contains(&t));
            numbers_used.insert(n);
            if tied {
                continue;
            }
            slots_used.insert(s);
            placed.push(Placed {
                slot: candidates[s].name.clone(),
                value: numbers[n].0,
                range: numbers[n].1.clone(),
            });
        }
        placed.sort_by_key(|p| p.range.start);
        placed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(name: &str) -> SlotSpec {
        SlotSpec {
            name: name.into(),
            kind: SlotKind::Number,
        }
    }

    fn example(text: &str, slots: &[(&str, f64)]) -> Example {
        Example {
            text: text.into(),
            label: "x".into(),
            slots: Some(
                slots
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect(),
            ),
        }
    }

    fn placed(cues: &NumberCues, slots: &[SlotSpec], input: &str) -> Vec<(String, f64, String)> {
        cues.place(slots, input, &said_numbers(input), &[])
            .into_iter()
            .map(|p| (p.slot, p.value, input[p.range].to_string()))
            .collect()
    }

    fn p(slot: &str, value: f64, raw: &str) -> (String, f64, String) {
        (slot.into(), value, raw.into())
    }

    #[test]
    fn the_words_around_a_number_are_read_with_signs_spelt_out() {
        let text = "set the lamp to 50% now, then 2 Hours later";
        let said = said_numbers(text);
        let a = around(text, &said[0].1);
        assert_eq!(
            (a.unit.as_deref(), a.before.as_deref(), a.after.as_deref()),
            (Some("percent"), Some("to"), Some("now"))
        );
        let a = around(text, &said[1].1);
        assert_eq!(
            (a.unit.as_deref(), a.before.as_deref(), a.after.as_deref()),
            (Some("hour"), Some("then"), Some("later"))
        );
        assert_eq!(normal("20.5°C").as_deref(), Some("20.5°c"));
        assert_eq!(normal("°C").as_deref(), Some("degree"));
        assert_eq!(normal("class").as_deref(), Some("class"), "not 'clas'");
    }

    #[test]
    fn timer_numbers_go_where_their_words_point() {
        let slots = [
            number("hours"),
            number("minutes"),
            number("seconds"),
            number("start_hours"),
            number("start_minutes"),
        ];
        let cues = NumberCues::learn(
            &slots,
            &[
                example("decrease pizza timer by 5 minutes", &[("minutes", 5.0)]),
                example("pause 1 hour timer", &[("start_hours", 1.0)]),
                example(
                    "decrease timer for 1 hour by 5 minutes",
                    &[("minutes", 5.0), ("start_hours", 1.0)],
                ),
            ],
        );
        assert_eq!(
            placed(&cues, &slots, "add 5 minutes to 1 hour timer"),
            [p("minutes", 5.0, "5"), p("start_hours", 1.0, "1")],
            "unit and the word after it ('timer') point to the timer's length"
        );
        assert_eq!(
            placed(&cues, &slots, "add 1 hour to my timer"),
            [p("hours", 1.0, "1")],
            "the slot named the unit comes first when no word says otherwise"
        );
        assert_eq!(
            placed(&cues, &slots[..3], "1 hour 15 minute 30 second timer"),
            [
                p("hours", 1.0, "1"),
                p("minutes", 15.0, "15"),
                p("seconds", 30.0, "30")
            ],
            "a slot no example fills is found by its name"
        );
        assert_eq!(
            placed(&cues, &slots[..3], "set it for a while"),
            [],
            "no number, nothing placed"
        );
    }

    #[test]
    fn one_number_and_one_number_slot_belong_together() {
        let slots = [number("position")];
        let cues = NumberCues::default();
        assert_eq!(
            placed(&cues, &slots, "open main valve to 100"),
            [p("position", 100.0, "100")]
        );
        assert_eq!(
            cues.place(
                &slots,
                "open bedroom 2 blinds",
                &said_numbers("open bedroom 2 blinds"),
                &[Range { start: 5, end: 14 }]
            ),
            [],
            "a number inside a known name is not a quantity"
        );
    }

    #[test]
    fn words_that_do_not_decide_leave_the_number_to_the_model() {
        let slots = [number("brightness"), number("temperature")];
        let cues = NumberCues::learn(
            &slots,
            &[
                example("lamp to 40 percent", &[("brightness", 40.0)]),
                example("heat to 20 degrees", &[("temperature", 20.0)]),
            ],
        );
        assert_eq!(
            placed(&cues, &slots, "lamp to 50% and heat to 21°"),
            [p("brightness", 50.0, "50%"), p("temperature", 21.0, "21°")]
        );
        assert_eq!(
            placed(&cues, &slots, "set 50 and 21"),
            [],
            "no unit evidence"
        );
    }
}
