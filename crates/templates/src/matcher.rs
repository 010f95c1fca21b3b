//! Matching one input against every compiled sentence: a backtracking
//! walk over the template tree, continuation-passing so that a later part
//! can reject an earlier part's choice (which entity, where a wildcard
//! ends) and the walk tries the next one.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::Value;

use crate::{List, Match, Node, RangeFile, Templates, Want};

/// Longer inputs are left to the model: no spoken command is this long,
/// and the walk's cost grows with the length.
pub const MAX_INPUT_CHARS: usize = 300;

/// Steps one sentence may take before it is given up on, and all
/// sentences together for one input: a bound on the walk's cost whatever
/// the input and the templates (milliseconds, not seconds).
const MAX_STEPS: u32 = 20_000;
const MAX_TOTAL_STEPS: u32 = 400_000;

/// One slot filled on the way, and those before it.
struct Filled<'t> {
    name: &'t str,
    value: Value,
    context: &'t [(String, String)],
    before: Option<Rc<Filled<'t>>>,
}

#[derive(Clone, Default)]
struct State<'t> {
    filled: Option<Rc<Filled<'t>>>,
    /// Template characters matched literally.
    literal: u32,
    /// Wildcards used.
    wild: u32,
}

impl<'t> State<'t> {
    fn fill(&self, name: &'t str, value: Value, context: &'t [(String, String)]) -> State<'t> {
        State {
            filled: Some(Rc::new(Filled {
                name,
                value,
                context,
                before: self.filled.clone(),
            })),
            ..self.clone()
        }
    }

    /// Filled slots, first filled first.
    fn slots(&self) -> Vec<&Filled<'t>> {
        let mut out = Vec::new();
        let mut at = self.filled.as_deref();
        while let Some(f) = at {
            out.push(f);
            at = f.before.as_deref();
        }
        out.reverse();
        out
    }
}

type Then<'a, 't> = &'a mut dyn FnMut(usize, &State<'t>) -> bool;

struct Walk<'t> {
    input: &'t [char],
    lists: &'t [List],
    steps: Cell<u32>,
    total: &'t Cell<u32>,
}

/// A match's last say: `None` refuses it (an intent the query excludes),
/// and the walk looks on for another.
pub type Accept<'a> = &'a dyn Fn(Match) -> Option<Match>;

/// The best match of `input` (normalised) over all sentences that
/// `accept` takes.
pub fn best(
    t: &Templates,
    input: &str,
    context: &BTreeMap<String, String>,
    accept: Accept<'_>,
    total: &Cell<u32>,
) -> Option<Match> {
    let chars: Vec<char> = input.chars().collect();
    // Fewest wildcards, then an entity named, then most literal text (a
    // list value's words are not), then most slots filled.
    type Rank = (u32, bool, std::cmp::Reverse<u32>, std::cmp::Reverse<usize>);
    let mut best: Option<(Rank, Match)> = None;
    for s in &t.sentences {
        if total.get() > MAX_TOTAL_STEPS {
            break;
        }
        let walk = Walk {
            input: &chars,
            lists: &t.lists,
            steps: Cell::new(0),
            total,
        };
        let block = &t.blocks[s.block];
        let mut found = None;
        walk.node(&s.node, 0, &State::default(), &mut |end, st| {
            if walk.skip_spaces(end) != chars.len() {
                return false;
            }
            match judge(block, st, context).and_then(accept) {
                Some(m) => {
                    let named = m.slots.iter().any(|(k, _)| k == "name");
                    let filled = std::cmp::Reverse(m.slots.len());
                    found = Some(((st.wild, !named, std::cmp::Reverse(st.literal), filled), m));
                    true
                }
                None => false,
            }
        });
        if let Some((rank, m)) = found {
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, m));
            }
        }
    }
    best.map(|(_, m)| m)
}

/// The block's answer for a full match, if the context allows it.
fn judge(
    block: &crate::Block,
    st: &State<'_>,
    context: &BTreeMap<String, String>,
) -> Option<Match> {
    let filled = st.slots();
    let mut known: BTreeMap<&str, &str> = context
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for f in &filled {
        known.extend(f.context.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    let fits = |want: &Want, value: Option<&str>| match (want, value) {
        (_, None) => false,
        (Want::Any, Some(_)) | (Want::Slot(None), Some(_)) => true,
        (Want::OneOf(vs) | Want::Slot(Some(vs)), Some(v)) => vs.iter().any(|x| x == v),
    };
    let mut slots: Vec<(String, Value)> = block.slots.clone();
    for (key, want) in &block.requires {
        let value = known.get(key.as_str()).copied();
        if !fits(want, value) {
            return None;
        }
        if let (Want::Slot(_), Some(v)) = (want, value) {
            slots.push((key.clone(), Value::String(v.to_owned())));
        }
    }
    for (key, want) in &block.excludes {
        if fits(want, known.get(key.as_str()).copied()) {
            return None;
        }
    }
    for f in filled {
        slots.push((f.name.to_owned(), f.value.clone()));
    }
    // Each name once, the last value given.
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<(String, Value)> = slots
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    unique.reverse();
    Some(Match {
        intent: block.intent.clone(),
        slots: unique,
    })
}

impl<'t> Walk<'t> {
    fn skip_spaces(&self, mut pos: usize) -> usize {
        while self.input.get(pos) == Some(&' ') {
            pos += 1;
        }
        pos
    }

    /// Calls `then` with each place `node` can end when it starts at
    /// `pos`, until `then` says stop (true).
    fn node(&self, node: &'t Node, pos: usize, st: &State<'t>, then: Then<'_, 't>) -> bool {
        let steps = self.steps.get() + 1;
        self.steps.set(steps);
        self.total.set(self.total.get() + 1);
        if steps > MAX_STEPS || self.total.get() > MAX_TOTAL_STEPS {
            return true;
        }
        match node {
            Node::Text(t) => match self.text(t, pos) {
                Some(end) => {
                    let st = State {
                        literal: st.literal + t.iter().filter(|c| **c != ' ').count() as u32,
                        ..st.clone()
                    };
                    then(end, &st)
                }
                None => false,
            },
            Node::Seq(items) => self.seq(items, pos, st, then),
            Node::Alt(branches) => branches.iter().any(|b| self.node(b, pos, st, then)),
            Node::List { list, slot } => self.list(&self.lists[*list], slot, pos, st, then),
        }
    }

    fn seq(&self, items: &'t [Node], pos: usize, st: &State<'t>, then: Then<'_, 't>) -> bool {
        match items.split_first() {
            None => then(pos, st),
            Some((first, rest)) => {
                self.node(first, pos, st, &mut |p, s| self.seq(rest, p, s, then))
            }
        }
    }

    /// Whether `pos` is between words (or at either end, or beside a
    /// sign such as `%`: "40%" is "40 %").
    fn at_boundary(&self, pos: usize) -> bool {
        pos == 0
            || pos >= self.input.len()
            || !self.input[pos].is_alphanumeric()
            || !self.input[pos - 1].is_alphanumeric()
    }

    /// Where literal text `t` ends if it matches at `pos`; a space in the
    /// template matches a run of spaces, or none where the input is
    /// already between words ("turnon" is not "turn on").
    fn text(&self, t: &[char], mut pos: usize) -> Option<usize> {
        for &c in t {
            if c == ' ' {
                if !self.at_boundary(pos) {
                    return None;
                }
                pos = self.skip_spaces(pos);
            } else if self.input.get(pos) == Some(&c) {
                pos += 1;
            } else {
                return None;
            }
        }
        Some(pos)
    }

    fn list(
        &self,
        list: &'t List,
        slot: &'t str,
        pos: usize,
        st: &State<'t>,
        then: Then<'_, 't>,
    ) -> bool {
        let start = self.skip_spaces(pos);
        // A value starts a word: "additional" holds no "add {item}".
        if !self.at_boundary(start) {
            return false;
        }
        match list {
            List::Values(items) => items.iter().any(|item| {
                self.node(&item.node, start, st, &mut |end, s| {
                    let value = item.out.clone().unwrap_or_else(|| {
                        let words: String = self.input[start..end].iter().collect();
                        Value::String(words.trim().to_owned())
                    });
                    // A value's words are not the sentence's literal text.
                    let s = State {
                        literal: st.literal,
                        ..s.clone()
                    };
                    then(end, &s.fill(slot, value, &item.context))
                })
            }),
            List::Range(range) => match number(self.input, start, range) {
                Some((end, value)) => then(end, &st.fill(slot, value, &[])),
                None => false,
            },
            List::Wildcard => (start + 1..=self.input.len())
                .filter(|&end| end == self.input.len() || self.input[end] == ' ')
                .any(|end| {
                    let words: String = self.input[start..end].iter().collect();
                    let st = State {
                        wild: st.wild + 1,
                        ..st.clone()
                    };
                    then(end, &st.fill(slot, Value::String(words), &[]))
                }),
        }
    }
}

/// A number in `range` written in digits at `pos`: where it ends and its
/// value (times the range's multiplier).
fn number(input: &[char], pos: usize, range: &RangeFile) -> Option<(usize, Value)> {
    let mut end = pos;
    if input.get(end) == Some(&'-') {
        end += 1;
    }
    let digits = |mut i: usize| {
        while input.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        i
    };
    let whole_end = digits(end);
    if whole_end == end {
        return None;
    }
    end = whole_end;
    if matches!(input.get(end), Some('.' | ','))
        && input.get(end + 1).is_some_and(|c| c.is_ascii_digit())
    {
        end = digits(end + 1);
    }
    if input.get(end).is_some_and(|c| c.is_alphanumeric()) {
        return None;
    }
    let text: String = input[pos..end].iter().collect();
    let n: f64 = text.replace(',', ".").parse().ok()?;
    if n < range.from || n > range.to {
        return None;
    }
    let per_unit = match range.fractions.as_deref() {
        Some("halves") => 2.0,
        Some("tenths") => 10.0,
        _ => 1.0,
    };
    if (n * per_unit).fract() != 0.0 {
        return None;
    }
    if let Some(step) = range.step.filter(|s| *s > 0.0) {
        if n.fract() == 0.0 && ((n - range.from) / step).fract() != 0.0 {
            return None;
        }
    }
    let n = n * range.multiplier.unwrap_or(1.0);
    let value = if n.fract() == 0.0 && n.abs() < 1e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    };
    Some((end, value))
}
