//! Slot values from the speaker's situation rather than the message.
//!
//! "Skip to next track" said to the living room's voice satellite means the
//! living room's player: Home Assistant fills `area` from the satellite's
//! area when the sentence names none. A query's context carries such values
//! (JSON `context`, a Hermes `siteId`); after grounding, each fills its slot
//! when
//!
//! - the recognised intent takes that slot and the reply left it empty,
//! - the reply names no target of its own (a `name`: "turn on the
//!   overhead light" is that light wherever the speaker is), and
//! - the value is one of the slot's known values (an enum), so a site id
//!   that is not an area of the home fills nothing.
//!
//! Such a slot has no span: it was not said.

use std::collections::BTreeMap;

use super::schema::{Slot, SlotKind, SlotSpec, SlotValue};

/// The slot that names one target; a reply with it takes no context.
const TARGET: &str = "name";

/// Fills `found`'s empty slots among `slots` from `context`.
pub fn fill(slots: &[SlotSpec], found: &mut Vec<Slot>, context: &BTreeMap<String, String>) {
    if context.is_empty() || found.iter().any(|s| s.name == TARGET) {
        return;
    }
    for (name, given) in context {
        if found.iter().any(|s| &s.name == name) {
            continue;
        }
        let Some(spec) = slots.iter().find(|s| &s.name == name) else {
            continue;
        };
        if let Some(value) = known(spec, given) {
            found.push(Slot {
                name: name.clone(),
                value: SlotValue::Text(value.to_owned()),
                span: None,
            });
        }
    }
}

/// `given` in the spelling of one of `spec`'s enum values, ignoring case
/// and taking `_` and `-` as spaces (`living_room` is "Living Room").
fn known<'s>(spec: &'s SlotSpec, given: &str) -> Option<&'s str> {
    let SlotKind::Enum { values, .. } = &spec.kind else {
        return None;
    };
    let given = given.trim().replace(['_', '-'], " ");
    values
        .iter()
        .find(|v| v.eq_ignore_ascii_case(&given))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<SlotSpec> {
        let kind = |values: &[&str]| SlotKind::Enum {
            values: values.iter().map(|v| v.to_string()).collect(),
            open: true,
        };
        vec![
            SlotSpec {
                name: "area".into(),
                kind: kind(&["Kitchen", "Living Room"]),
            },
            SlotSpec {
                name: "name".into(),
                kind: kind(&["Overhead Light"]),
            },
            SlotSpec {
                name: "search_query".into(),
                kind: SlotKind::String,
            },
        ]
    }

    fn text(name: &str, value: &str) -> Slot {
        Slot {
            name: name.into(),
            value: SlotValue::Text(value.into()),
            span: None,
        }
    }

    fn context(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn filled(found: Vec<Slot>, pairs: &[(&str, &str)]) -> Vec<Slot> {
        let mut found = found;
        fill(&slots(), &mut found, &context(pairs));
        found
    }

    #[test]
    fn the_speakers_area_fills_an_empty_area_in_its_known_spelling() {
        let got = filled(vec![], &[("area", "living_room")]);
        assert_eq!(got, vec![text("area", "Living Room")]);
        assert_eq!(got[0].span, None);
    }

    #[test]
    fn a_said_area_or_a_named_target_wins_over_the_context() {
        let said = vec![text("area", "Kitchen")];
        assert_eq!(filled(said.clone(), &[("area", "Living Room")]), said);
        let named = vec![text("name", "Overhead Light")];
        assert_eq!(filled(named.clone(), &[("area", "Living Room")]), named);
    }

    #[test]
    fn unknown_values_and_slots_the_intent_does_not_take_fill_nothing() {
        let none: &[Slot] = &[];
        assert_eq!(filled(vec![], &[("area", "satellite1")]), none);
        assert_eq!(filled(vec![], &[("floor", "Upstairs")]), none);
        // Free-text slots have no known values to check a context against.
        assert_eq!(filled(vec![], &[("search_query", "jazz")]), none);
    }
}
