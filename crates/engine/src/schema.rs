//! Slot schemas for the `extract` task kind: the GBNF grammar that constrains
//! slot generation, parsing and validating what was generated, and finding
//! where in the input each value was said.
//!
//! The grammar from [`gbnf`] admits exactly one compact JSON object per
//! schema. Every key is optional (a command rarely mentions every slot, and
//! leaving a key out is how the model says "not given"), appears at most once,
//! and keys come in schema order. The fixed order makes the grammar
//! unambiguous and small, and it stops the model from repeating a key. Values
//! are typed and bounded (strings at most [`MAX_STRING_CHARS`] characters,
//! numbers at most [`MAX_INT_DIGITS`] + [`MAX_FRAC_DIGITS`] digits, enum values
//! spelt exactly), so every generation terminates with JSON that
//! [`parse_output`] accepts. The only whitespace allowed is one optional space
//! after `:` and `,`.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest string slot value the grammar admits, in characters.
pub const MAX_STRING_CHARS: usize = 48;
/// Most digits the grammar admits before a number's decimal point.
pub const MAX_INT_DIGITS: usize = 8;
/// Most digits the grammar admits after a number's decimal point.
pub const MAX_FRAC_DIGITS: usize = 4;

/// The type of one slot. In TOML: `{ name = "area", type = "enum", values = ["Kitchen"] }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SlotKind {
    /// Free text, at most [`MAX_STRING_CHARS`] characters.
    String,
    /// A decimal number.
    Number,
    /// One of `values`; when `open`, also any other string (the known values
    /// guide the model and fix the spelling of what matches them).
    Enum {
        values: Vec<String>,
        #[serde(default)]
        open: bool,
    },
}

/// One named slot of an extraction schema.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SlotSpec {
    /// JSON key; ASCII letters, digits and `_` only.
    pub name: String,
    #[serde(flatten)]
    pub kind: SlotKind,
}

/// A slot value as produced.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotValue {
    Text(String),
    Number(f64),
}

/// Text as a JSON string; a whole number as a JSON integer (`40`, not
/// `40.0`), any other number as it is.
impl Serialize for SlotValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SlotValue::Text(t) => s.serialize_str(t),
            SlotValue::Number(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => {
                s.serialize_i64(*x as i64)
            }
            SlotValue::Number(x) => s.serialize_f64(*x),
        }
    }
}

impl fmt::Display for SlotValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotValue::Text(t) => f.write_str(t),
            SlotValue::Number(x) => write!(f, "{x}"),
        }
    }
}

/// Where a value was said: byte offsets into the input (`end` exclusive) and
/// the text there, `raw == &input[start..end]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub raw: String,
}

impl Span {
    /// `input[start..end]` as a span.
    pub fn of(input: &str, start: usize, end: usize) -> Span {
        Span {
            start,
            end,
            raw: input[start..end].to_string(),
        }
    }
}

/// One extracted slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slot {
    pub name: String,
    pub value: SlotValue,
    /// `None` when the value cannot be found in the input.
    pub span: Option<Span>,
}

/// A bad schema, or generated text that does not fit its schema.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("slot schema: a slot has an empty name")]
    EmptyName,
    #[error("slot schema: slot name {0:?} may hold only ASCII letters, digits and '_'")]
    BadName(String),
    #[error("slot schema: slot {0:?} is declared more than once")]
    DuplicateName(String),
    #[error("slot schema: enum slot {0:?} has no values")]
    EmptyEnum(String),
    #[error("slot schema: enum slot {slot:?} has an empty or repeated value {value:?}")]
    BadEnumValue { slot: String, value: String },
    #[error("generated slots are not valid JSON: {0}")]
    InvalidJson(String),
    #[error("generated slots are not a JSON object")]
    NotAnObject,
    #[error("generated slots name an unknown slot {0:?}")]
    UnknownSlot(String),
    #[error("generated slots give slot {0:?} more than once")]
    DuplicateSlot(String),
    #[error("generated slot {slot:?} is not {expected}")]
    WrongType {
        slot: String,
        expected: &'static str,
    },
    #[error("generated slot {slot:?} has {value:?}, which is not one of its values")]
    NotInEnum { slot: String, value: String },
}

/// Checks names (non-empty, `[A-Za-z0-9_]`, unique) and enum values (at least
/// one; none empty; no two equal ignoring case, as [`parse_output`] matches
/// them ignoring case).
pub fn validate_schema(slots: &[SlotSpec]) -> Result<(), SchemaError> {
    let mut names = HashSet::new();
    for slot in slots {
        if slot.name.is_empty() {
            return Err(SchemaError::EmptyName);
        }
        if !slot
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(SchemaError::BadName(slot.name.clone()));
        }
        if !names.insert(slot.name.as_str()) {
            return Err(SchemaError::DuplicateName(slot.name.clone()));
        }
        if let SlotKind::Enum { values, .. } = &slot.kind {
            if values.is_empty() {
                return Err(SchemaError::EmptyEnum(slot.name.clone()));
            }
            let mut seen = HashSet::new();
            for value in values {
                if value.trim().is_empty() || !seen.insert(value.to_lowercase()) {
                    return Err(SchemaError::BadEnumValue {
                        slot: slot.name.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The GBNF grammar (root rule `root`) for a JSON object holding any subset
/// of `slots`, in schema order, each value typed. See the module docs.
/// Call [`validate_schema`] first; rule names come from slot indices, so any
/// slot names give a well-formed grammar.
pub fn gbnf(slots: &[SlotSpec]) -> String {
    let n = slots.len();
    // Member `j` followed by whatever may come after it.
    let from = |j: usize| {
        if j + 1 == n {
            format!("member-{j}")
        } else {
            format!("member-{j} tail-{j}")
        }
    };
    let choices = |range: std::ops::Range<usize>| range.map(from).collect::<Vec<_>>().join(" | ");

    let mut out = String::new();
    if n == 0 {
        out.push_str("root ::= \"{\" \"}\"\n");
    } else {
        out.push_str(&format!("root ::= \"{{\" ({})? \"}}\"\n", choices(0..n)));
    }
    for i in 0..n.saturating_sub(1) {
        out.push_str(&format!(
            "tail-{i} ::= (\",\" \" \"? ({}))?\n",
            choices(i + 1..n)
        ));
    }
    let (mut strings, mut numbers) = (false, false);
    for (i, slot) in slots.iter().enumerate() {
        let key = gbnf_literal(&format!("{}:", json_string(&slot.name)));
        let value = match &slot.kind {
            SlotKind::String => {
                strings = true;
                "string".to_string()
            }
            SlotKind::Number => {
                numbers = true;
                "number".to_string()
            }
            SlotKind::Enum { values, open } => {
                let mut alternatives: Vec<String> = values
                    .iter()
                    .map(|v| gbnf_literal(&json_string(v)))
                    .collect();
                if *open {
                    strings = true;
                    alternatives.push("string".into());
                }
                out.push_str(&format!("enum-{i} ::= {}\n", alternatives.join(" | ")));
                format!("enum-{i}")
            }
        };
        out.push_str(&format!("member-{i} ::= {key} \" \"? {value}\n"));
    }
    if strings {
        out.push_str(&format!(
            "string ::= \"\\\"\" char{{1,{MAX_STRING_CHARS}}} \"\\\"\"\n"
        ));
        out.push_str("char ::= [^\"\\\\\\x00-\\x1F\\x7F] | \"\\\\\" [\"\\\\/bfnrt]\n");
    }
    if numbers {
        out.push_str(&format!(
            "number ::= \"-\"? (\"0\" | [1-9] [0-9]{{0,{}}}) (\".\" [0-9]{{1,{MAX_FRAC_DIGITS}}})?\n",
            MAX_INT_DIGITS - 1
        ));
    }
    out
}

/// `s` as a JSON string literal, quotes included.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serialises")
}

/// `s` as a GBNF string literal, quotes included.
fn gbnf_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON object's members in document order, duplicates kept.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Parses generated text into slots, in schema order. Keys must be slot names
/// (exactly) and appear once; numbers must be JSON numbers; strings are
/// trimmed; enum values match ignoring case and come back in the schema's
/// spelling. `null` or an empty string means "absent". Spans come from
/// [`find_span`].
pub fn parse_output(
    slots: &[SlotSpec],
    generated: &str,
    input: &str,
) -> Result<Vec<Slot>, SchemaError> {
    let text = generated.trim();
    let value: Value =
        serde_json::from_str(text).map_err(|e| SchemaError::InvalidJson(e.to_string()))?;
    if !value.is_object() {
        return Err(SchemaError::NotAnObject);
    }
    let Members(members) =
        serde_json::from_str(text).map_err(|e| SchemaError::InvalidJson(e.to_string()))?;

    let mut found: Vec<Option<SlotValue>> = vec![None; slots.len()];
    let mut seen = vec![false; slots.len()];
    for (key, value) in members {
        let index = slots
            .iter()
            .position(|s| s.name == key)
            .ok_or_else(|| SchemaError::UnknownSlot(key.clone()))?;
        if std::mem::replace(&mut seen[index], true) {
            return Err(SchemaError::DuplicateSlot(key));
        }
        found[index] = slot_value(&slots[index], value)?;
    }
    Ok(slots
        .iter()
        .zip(found)
        .filter_map(|(spec, value)| {
            let value = value?;
            Some(Slot {
                name: spec.name.clone(),
                span: find_span(input, &value),
                value,
            })
        })
        .collect())
}

/// One member's value checked against its slot; `None` when absent.
fn slot_value(spec: &SlotSpec, value: Value) -> Result<Option<SlotValue>, SchemaError> {
    let text = match value {
        Value::Null => return Ok(None),
        Value::String(s) => {
            let trimmed = s.trim();
            if trimmed.is_empty() {
                return Ok(None);
            }
            Some(trimmed.to_string())
        }
        Value::Number(number) => {
            if spec.kind == SlotKind::Number {
                if let Some(x) = number.as_f64().filter(|x| x.is_finite()) {
                    return Ok(Some(SlotValue::Number(x)));
                }
            }
            None
        }
        _ => None,
    };
    let wrong = |expected| SchemaError::WrongType {
        slot: spec.name.clone(),
        expected,
    };
    match (&spec.kind, text) {
        (SlotKind::String, Some(text)) => Ok(Some(SlotValue::Text(text))),
        (SlotKind::String, None) => Err(wrong("a string")),
        (SlotKind::Number, _) => Err(wrong("a number")),
        (SlotKind::Enum { values, open }, Some(text)) => values
            .iter()
            .find(|v| v.as_str() == text || v.to_lowercase() == text.to_lowercase())
            .map(|v| Some(SlotValue::Text(v.clone())))
            .or_else(|| open.then(|| Some(SlotValue::Text(text.clone()))))
            .ok_or(SchemaError::NotInEnum {
                slot: spec.name.clone(),
                value: text,
            }),
        (SlotKind::Enum { .. }, None) => Err(wrong("a string")),
    }
}

/// `value` in `input` on word boundaries, ignoring case.
pub(crate) fn find_word(input: &str, value: &str) -> Option<(usize, usize)> {
    if value.is_empty() {
        return None;
    }
    search(input, value, on_word)
}

/// Whether `input[start..end]` is whole words: no letter or digit joins it
/// on either side.
fn on_word(input: &str, start: usize, end: usize) -> bool {
    !matches!(char_before(input, start), Some(c) if c.is_alphanumeric())
        && !matches!(input[end..].chars().next(), Some(c) if c.is_alphanumeric())
}

/// Adds `value` to `values` unless it is there already, ignoring ASCII case.
pub fn add_value(values: &mut Vec<String>, value: &str) {
    if !values.iter().any(|x| x.eq_ignore_ascii_case(value)) {
        values.push(value.to_owned());
    }
}

/// Where in `input` a value was said, or `None`.
///
/// Text is matched ignoring case, preferably on word boundaries: first the
/// value itself and the value with `_` as space, then (on word boundaries
/// only) their singular/plural forms by a trailing `s`, then the value and its
/// `_`-as-space form anywhere. Numbers are matched as written (`21`, `21.5`,
/// also `21,5`; a negative one also without its sign), never inside a longer
/// number; a directly following `%` joins the span. Offsets are byte offsets.
pub fn find_span(input: &str, value: &SlotValue) -> Option<Span> {
    let (start, end) = match value {
        SlotValue::Text(text) => find_text(input, text.trim())?,
        SlotValue::Number(x) => find_number(input, *x)?,
    };
    Some(Span::of(input, start, end))
}

fn find_text(input: &str, text: &str) -> Option<(usize, usize)> {
    if text.is_empty() {
        return None;
    }
    let mut exact = vec![text.to_string()];
    let spaced = text.replace('_', " ");
    if spaced != text {
        exact.push(spaced);
    }
    let variants: Vec<String> = exact
        .iter()
        .map(|t| match t.strip_suffix(['s', 'S']) {
            Some(singular) if !singular.is_empty() => singular.to_string(),
            _ => format!("{t}s"),
        })
        .collect();
    exact
        .iter()
        .chain(&variants)
        .find_map(|t| search(input, t, on_word))
        .or_else(|| exact.iter().find_map(|t| search(input, t, |_, _, _| true)))
}

fn find_number(input: &str, x: f64) -> Option<(usize, usize)> {
    if !x.is_finite() {
        return None;
    }
    let mut forms = vec![number_text(x)];
    if x < 0.0 {
        forms.push(number_text(-x));
    }
    let commas: Vec<String> = forms
        .iter()
        .filter(|f| f.contains('.'))
        .map(|f| f.replace('.', ","))
        .collect();
    forms.extend(commas);
    // Not inside a longer number or word: "50" is not found in "150", "2.50"
    // or "50a".
    let alone = |input: &str, start: usize, end: usize| {
        let before = char_before(input, start);
        let digit_before = before
            .and_then(|c| char_before(input, start - c.len_utf8()))
            .is_some_and(|c| c.is_ascii_digit());
        let mut after = input[end..].chars();
        let (next, next2) = (after.next(), after.next());
        let digit_after = next2.is_some_and(|c| c.is_ascii_digit());
        let glued = |c: Option<char>, digit_beyond: bool| match c {
            Some('.' | ',') => digit_beyond,
            Some(c) => c.is_alphanumeric(),
            None => false,
        };
        !glued(before, digit_before) && !glued(next, digit_after)
    };
    let (start, end) = forms.iter().find_map(|f| search(input, f, alone))?;
    let end = if input[end..].starts_with('%') {
        end + 1
    } else {
        end
    };
    Some((start, end))
}

/// `x` as digits: integers without a fraction, others in shortest form.
fn number_text(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn char_before(input: &str, at: usize) -> Option<char> {
    input[..at].chars().next_back()
}

/// First case-insensitive occurrence of `needle` in `input` that `accept`
/// (given input, start, end) allows, as byte offsets.
fn search(
    input: &str,
    needle: &str,
    accept: impl Fn(&str, usize, usize) -> bool,
) -> Option<(usize, usize)> {
    let needle: Vec<char> = needle.chars().collect();
    input.char_indices().find_map(|(start, _)| {
        let mut chars = input[start..].char_indices();
        for &want in &needle {
            let (_, got) = chars.next()?;
            if !same_letter(got, want) {
                return None;
            }
        }
        let end = chars
            .next()
            .map_or(input.len(), |(offset, _)| start + offset);
        accept(input, start, end).then_some((start, end))
    })
}

fn same_letter(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: SlotKind) -> SlotSpec {
        SlotSpec {
            name: name.to_string(),
            kind,
        }
    }

    fn enumeration(values: &[&str]) -> SlotKind {
        SlotKind::Enum {
            values: values.iter().map(|v| v.to_string()).collect(),
            open: false,
        }
    }

    #[test]
    fn whole_numbers_serialise_as_integers() {
        let v = |x: SlotValue| serde_json::to_string(&x).unwrap();
        assert_eq!(v(SlotValue::Number(40.0)), "40");
        assert_eq!(v(SlotValue::Number(20.5)), "20.5");
        assert_eq!(v(SlotValue::Number(-3.0)), "-3");
        assert_eq!(v(SlotValue::Text("Kitchen".into())), "\"Kitchen\"");
    }

    #[test]
    fn an_open_enum_admits_other_strings_and_fixes_known_spellings() {
        let slots = vec![spec(
            "name",
            SlotKind::Enum {
                values: vec!["Bedroom Lamp".into()],
                open: true,
            },
        )];
        let grammar = gbnf(&slots);
        assert!(
            grammar.contains("\"\\\"Bedroom Lamp\\\"\" | string"),
            "{grammar}"
        );
        assert!(grammar.contains("string ::="), "{grammar}");
        let input = "dim the bedroom lamp, then the pizza timer";
        let got = parse_output(&slots, r#"{"name": "bedroom lamp"}"#, input).unwrap();
        assert_eq!(got[0].value, SlotValue::Text("Bedroom Lamp".into()));
        let got = parse_output(&slots, r#"{"name": "pizza"}"#, input).unwrap();
        assert_eq!(got[0].value, SlotValue::Text("pizza".into()));
        assert_eq!(got[0].span.as_ref().map(|s| s.raw.as_str()), Some("pizza"));
    }

    /// area (enum), brightness (number), label (string), mode (enum with
    /// awkward characters).
    fn lights() -> Vec<SlotSpec> {
        vec![
            spec("area", enumeration(&["Kitchen", "Living room"])),
            spec("brightness", SlotKind::Number),
            spec("label", SlotKind::String),
            spec("mode", enumeration(&["say \"hi\"", "back\\slash", "plain"])),
        ]
    }

    /// A recogniser for the subset of GBNF that [`gbnf`] emits: one rule per
    /// line; literals, character classes (ranges, negation), grouping,
    /// alternation, `?`, `*`, `+`, `{m,n}` and rule references.
    mod recogniser {
        use std::collections::{BTreeSet, HashMap};

        #[derive(Debug)]
        enum Expr {
            Lit(Vec<char>),
            Class(bool, Vec<(char, char)>),
            Ref(String),
            Seq(Vec<Expr>),
            Alt(Vec<Expr>),
            Rep(Box<Expr>, usize, Option<usize>),
        }

        pub struct Grammar(HashMap<String, Expr>);

        struct Parser {
            s: Vec<char>,
            i: usize,
        }

        impl Parser {
            fn peek(&mut self) -> Option<char> {
                while self.s.get(self.i) == Some(&' ') {
                    self.i += 1;
                }
                self.s.get(self.i).copied()
            }
            fn next(&mut self) -> char {
                let c = self.s[self.i];
                self.i += 1;
                c
            }
            fn number(&mut self) -> usize {
                let start = self.i;
                while self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                self.s[start..self.i]
                    .iter()
                    .collect::<String>()
                    .parse()
                    .unwrap()
            }
            fn escaped(&mut self) -> char {
                let c = self.next();
                if c != '\\' {
                    return c;
                }
                let hex = |p: &mut Self, n| {
                    let digits: String = (0..n).map(|_| p.next()).collect();
                    char::from_u32(u32::from_str_radix(&digits, 16).unwrap()).unwrap()
                };
                match self.next() {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'x' => hex(self, 2),
                    'u' => hex(self, 4),
                    c => c,
                }
            }
            fn alt(&mut self) -> Expr {
                let mut alts = vec![self.seq()];
                while self.peek() == Some('|') {
                    self.i += 1;
                    alts.push(self.seq());
                }
                if alts.len() == 1 {
                    alts.pop().unwrap()
                } else {
                    Expr::Alt(alts)
                }
            }
            fn seq(&mut self) -> Expr {
                let mut items = Vec::new();
                while !matches!(self.peek(), None | Some('|' | ')')) {
                    let mut atom = self.atom();
                    loop {
                        let (min, max) = match self.s.get(self.i) {
                            Some('?') => (0, Some(1)),
                            Some('*') => (0, None),
                            Some('+') => (1, None),
                            Some('{') => {
                                self.i += 1;
                                let min = self.number();
                                let max = if self.s[self.i] == ',' {
                                    self.i += 1;
                                    (self.s[self.i] != '}').then(|| self.number())
                                } else {
                                    Some(min)
                                };
                                assert_eq!(self.s[self.i], '}');
                                (min, max)
                            }
                            _ => break,
                        };
                        self.i += 1;
                        atom = Expr::Rep(Box::new(atom), min, max);
                    }
                    items.push(atom);
                }
                Expr::Seq(items)
            }
            fn atom(&mut self) -> Expr {
                match self.next() {
                    '"' => {
                        let mut lit = Vec::new();
                        while self.s[self.i] != '"' {
                            lit.push(self.escaped());
                        }
                        self.i += 1;
                        Expr::Lit(lit)
                    }
                    '[' => {
                        let negated = self.s[self.i] == '^';
                        self.i += negated as usize;
                        let mut ranges = Vec::new();
                        while self.s[self.i] != ']' {
                            let lo = self.escaped();
                            let hi = if self.s[self.i] == '-' && self.s[self.i + 1] != ']' {
                                self.i += 1;
                                self.escaped()
                            } else {
                                lo
                            };
                            ranges.push((lo, hi));
                        }
                        self.i += 1;
                        Expr::Class(negated, ranges)
                    }
                    '(' => {
                        let inner = self.alt();
                        assert_eq!(self.peek(), Some(')'), "unclosed group");
                        self.i += 1;
                        inner
                    }
                    c if c.is_ascii_lowercase() => {
                        let start = self.i - 1;
                        while self.s.get(self.i).is_some_and(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'
                        }) {
                            self.i += 1;
                        }
                        Expr::Ref(self.s[start..self.i].iter().collect())
                    }
                    c => panic!("unexpected {c:?} at {}", self.i),
                }
            }
        }

        impl Grammar {
            pub fn parse(text: &str) -> Grammar {
                let mut rules = HashMap::new();
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let (name, body) = line.split_once(" ::= ").expect("a rule per line");
                    assert!(
                        !name.is_empty()
                            && name
                                .chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                        "bad rule name {name:?}"
                    );
                    let mut parser = Parser {
                        s: body.chars().collect(),
                        i: 0,
                    };
                    let expr = parser.alt();
                    assert_eq!(parser.peek(), None, "trailing text in {line:?}");
                    assert!(
                        rules.insert(name.to_string(), expr).is_none(),
                        "{name} twice"
                    );
                }
                assert!(rules.contains_key("root"));
                Grammar(rules)
            }

            pub fn accepts(&self, text: &str) -> bool {
                let s: Vec<char> = text.chars().collect();
                self.ends(&Expr::Ref("root".into()), &s, 0)
                    .contains(&s.len())
            }

            /// Every position at which a match of `e` starting at `at` can end.
            fn ends(&self, e: &Expr, s: &[char], at: usize) -> BTreeSet<usize> {
                let step = |e: &Expr, from: &BTreeSet<usize>| {
                    from.iter().flat_map(|&p| self.ends(e, s, p)).collect()
                };
                match e {
                    Expr::Lit(lit) => s[at..]
                        .starts_with(lit)
                        .then_some(at + lit.len())
                        .into_iter()
                        .collect(),
                    Expr::Class(negated, ranges) => s
                        .get(at)
                        .filter(|&&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                        .map(|_| at + 1)
                        .into_iter()
                        .collect(),
                    Expr::Ref(name) => self.ends(&self.0[name], s, at),
                    Expr::Seq(items) => items
                        .iter()
                        .fold(BTreeSet::from([at]), |acc, item| step(item, &acc)),
                    Expr::Alt(alts) => alts.iter().flat_map(|a| self.ends(a, s, at)).collect(),
                    Expr::Rep(inner, min, max) => {
                        let mut current = BTreeSet::from([at]);
                        let mut out = BTreeSet::new();
                        if *min == 0 {
                            out.insert(at);
                        }
                        for count in 1..=max.unwrap_or(s.len() - at + 1) {
                            current = step(inner, &current);
                            if current.is_empty() {
                                break;
                            }
                            if count >= *min {
                                out.extend(&current);
                            }
                        }
                        out
                    }
                }
            }
        }
    }

    use recogniser::Grammar;

    #[test]
    fn deserialises_the_three_kinds() {
        let parsed: Vec<SlotSpec> = serde_json::from_str(
            r#"[{"name":"area","type":"enum","values":["Kitchen"]},
                {"name":"level","type":"number"},
                {"name":"label","type":"string"}]"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                spec("area", enumeration(&["Kitchen"])),
                spec("level", SlotKind::Number),
                spec("label", SlotKind::String),
            ]
        );

        #[derive(Deserialize)]
        struct Task {
            slots: Vec<SlotSpec>,
        }
        let task: Task = toml::from_str(
            "slots = [\n  { name = \"area\", type = \"enum\", values = [\"Kitchen\", \"Hall\"] },\n  { name = \"level\", type = \"number\" },\n]\n",
        )
        .unwrap();
        assert_eq!(
            task.slots,
            vec![
                spec("area", enumeration(&["Kitchen", "Hall"])),
                spec("level", SlotKind::Number)
            ]
        );
        assert!(serde_json::from_str::<SlotSpec>(r#"{"name":"x","type":"date"}"#).is_err());
        assert!(serde_json::from_str::<SlotSpec>(r#"{"name":"x","type":"enum"}"#).is_err());
    }

    #[test]
    fn validate_schema_rejects_bad_schemas() {
        assert_eq!(validate_schema(&lights()), Ok(()));
        assert_eq!(validate_schema(&[]), Ok(()));
        let dup = [spec("a", SlotKind::Number), spec("a", SlotKind::String)];
        assert_eq!(
            validate_schema(&dup),
            Err(SchemaError::DuplicateName("a".into()))
        );
        assert_eq!(
            validate_schema(&[spec("e", enumeration(&[]))]),
            Err(SchemaError::EmptyEnum("e".into()))
        );
        assert_eq!(
            validate_schema(&[spec("e", enumeration(&["On", "on"]))]),
            Err(SchemaError::BadEnumValue {
                slot: "e".into(),
                value: "on".into()
            })
        );
        assert!(matches!(
            validate_schema(&[spec("e", enumeration(&[" "]))]),
            Err(SchemaError::BadEnumValue { .. })
        ));
        assert_eq!(
            validate_schema(&[spec("", SlotKind::Number)]),
            Err(SchemaError::EmptyName)
        );
        for bad in ["two words", "dash-ed", "quote\"", "Küche"] {
            assert_eq!(
                validate_schema(&[spec(bad, SlotKind::Number)]),
                Err(SchemaError::BadName(bad.into()))
            );
        }
    }

    #[test]
    fn gbnf_names_rules_and_escapes_literals() {
        let grammar = gbnf(&lights());
        assert!(grammar.starts_with("root ::= "), "{grammar}");
        for key in ["area", "brightness", "label", "mode"] {
            assert!(
                grammar.contains(&format!(r#""\"{key}\":""#)),
                "{key}: {grammar}"
            );
        }
        // JSON "say \"hi\"" and "back\\slash", each then escaped for GBNF.
        assert!(grammar.contains(r#""\"say \\\"hi\\\"\"""#), "{grammar}");
        assert!(grammar.contains(r#""\"back\\\\slash\"""#), "{grammar}");
        Grammar::parse(&grammar);
        assert_eq!(gbnf(&[]), "root ::= \"{\" \"}\"\n");
    }

    /// Texts the grammar of [`lights`] must accept.
    const ACCEPTED: &[&str] = &[
        "{}",
        r#"{"area": "Kitchen"}"#,
        r#"{"area":"Kitchen"}"#,
        r#"{"area": "Kitchen", "brightness": 50}"#,
        r#"{"area":"Living room","brightness":0}"#,
        r#"{"brightness": -2.5}"#,
        r#"{"label": "hello \"you\" \\ there"}"#,
        r#"{"label": "Küche"}"#,
        r#"{"area": "Kitchen", "brightness": 12345678.1234, "label": "x", "mode": "plain"}"#,
        r#"{"mode": "say \"hi\""}"#,
        r#"{"mode": "back\\slash"}"#,
        r#"{"label": "123456789012345678901234567890123456789012345678"}"#,
    ];

    #[test]
    fn grammar_accepts_valid_objects() {
        let grammar = Grammar::parse(&gbnf(&lights()));
        for text in ACCEPTED {
            assert!(grammar.accepts(text), "should accept {text}");
            // And whatever it accepts parses.
            parse_output(&lights(), text, "").unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn grammar_rejects_invalid_objects() {
        let grammar = Grammar::parse(&gbnf(&lights()));
        for text in [
            "",
            " {}",
            "{} ",
            "{ }",
            r#"{"brightness": 50, "area": "Kitchen"}"#,
            r#"{"area": "Kitchen", "area": "Kitchen"}"#,
            r#"{"area": "Garage"}"#,
            r#"{"area": "kitchen"}"#,
            r#"{"mode": "say "hi""}"#,
            r#"{"label": 5}"#,
            r#"{"brightness": "50"}"#,
            r#"{"brightness": 050}"#,
            r#"{"brightness": 1.}"#,
            r#"{"brightness": 123456789}"#,
            r#"{"brightness": 1.12345}"#,
            r#"{"brightness": null}"#,
            r#"{"label": ""}"#,
            r#"{"area": "Kitchen",}"#,
            r#"{,"area": "Kitchen"}"#,
            r#"{"area":  "Kitchen"}"#,
            r#"{"area" : "Kitchen"}"#,
            r#"{"area": "Kitchen" , "brightness": 5}"#,
            r#"{"unknown": 1}"#,
            "{\"label\": \"a\nb\"}",
            r#"{"label": "a\qb"}"#,
            r#"{"label": "1234567890123456789012345678901234567890123456789"}"#,
        ] {
            assert!(!grammar.accepts(text), "should reject {text}");
        }
    }

    #[test]
    fn grammar_allows_every_ordered_subset_and_no_other_order() {
        let slots: Vec<SlotSpec> = (0..5)
            .map(|i| spec(&format!("s{i}"), SlotKind::Number))
            .collect();
        let grammar = Grammar::parse(&gbnf(&slots));
        for mask in 0u32..32 {
            let keys: Vec<String> = (0..5)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| format!("\"s{i}\": {i}"))
                .collect();
            assert!(
                grammar.accepts(&format!("{{{}}}", keys.join(", "))),
                "{keys:?}"
            );
            if keys.len() > 1 {
                let reversed: Vec<_> = keys.iter().rev().cloned().collect();
                assert!(!grammar.accepts(&format!("{{{}}}", reversed.join(", "))));
            }
        }
    }

    #[test]
    fn parse_output_types_and_canonical_enum_values() {
        let input = "set the kitchen lights to 50% brightness";
        let slots = parse_output(
            &lights(),
            r#"{"area": "kitchen", "brightness": 50, "label": "  lights ", "mode": "PLAIN"}"#,
            input,
        )
        .unwrap();
        assert_eq!(slots.len(), 4);
        assert_eq!(slots[0].name, "area");
        assert_eq!(slots[0].value, SlotValue::Text("Kitchen".into()));
        assert_eq!(
            slots[0].span,
            Some(Span {
                start: 8,
                end: 15,
                raw: "kitchen".into()
            })
        );
        assert_eq!(slots[1].value, SlotValue::Number(50.0));
        assert_eq!(slots[1].span.as_ref().unwrap().raw, "50%");
        assert_eq!(slots[2].value, SlotValue::Text("lights".into()));
        assert_eq!(slots[2].span.as_ref().unwrap().start, 16);
        assert_eq!(slots[3].value, SlotValue::Text("plain".into()));
        assert_eq!(slots[3].span, None);
        assert_eq!(
            serde_json::to_value(&slots[1]).unwrap(),
            serde_json::json!({"name": "brightness", "value": 50, "span": {"start": 26, "end": 29, "raw": "50%"}})
        );
    }

    #[test]
    fn parse_output_skips_absent_values_and_keeps_schema_order() {
        let slots = parse_output(
            &lights(),
            r#"{"label": "x", "area": null, "mode": " ", "brightness": 2}"#,
            "",
        )
        .unwrap();
        let names: Vec<_> = slots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["brightness", "label"]);
        assert_eq!(parse_output(&lights(), " {} ", "").unwrap(), vec![]);
    }

    #[test]
    fn parse_output_errors() {
        let s = lights();
        let err = |text| parse_output(&s, text, "").unwrap_err();
        assert!(matches!(err(r#"{"area": "#), SchemaError::InvalidJson(_)));
        assert!(matches!(
            err(r#"{"area": "Kitchen"} x"#),
            SchemaError::InvalidJson(_)
        ));
        assert_eq!(err("[1]"), SchemaError::NotAnObject);
        assert_eq!(err("\"area\""), SchemaError::NotAnObject);
        assert_eq!(
            err(r#"{"room": "x"}"#),
            SchemaError::UnknownSlot("room".into())
        );
        assert_eq!(
            err(r#"{"Area": "Kitchen"}"#),
            SchemaError::UnknownSlot("Area".into())
        );
        assert_eq!(
            err(r#"{"area": "Kitchen", "area": "Kitchen"}"#),
            SchemaError::DuplicateSlot("area".into())
        );
        assert_eq!(
            err(r#"{"brightness": "50"}"#),
            SchemaError::WrongType {
                slot: "brightness".into(),
                expected: "a number"
            }
        );
        assert_eq!(
            err(r#"{"label": 5}"#),
            SchemaError::WrongType {
                slot: "label".into(),
                expected: "a string"
            }
        );
        assert!(matches!(
            err(r#"{"area": ["Kitchen"]}"#),
            SchemaError::WrongType { .. }
        ));
        assert!(matches!(
            err(r#"{"brightness": true}"#),
            SchemaError::WrongType { .. }
        ));
        assert_eq!(
            err(r#"{"area": "Garage"}"#),
            SchemaError::NotInEnum {
                slot: "area".into(),
                value: "Garage".into()
            }
        );
    }

    #[test]
    fn spans_are_byte_offsets_in_non_ascii_input() {
        let input = "Schalte das Licht in der Küche an";
        let schema = [spec("raum", enumeration(&["Küche", "Bad"]))];
        let slots = parse_output(&schema, r#"{"raum": "küche"}"#, input).unwrap();
        let span = slots[0].span.clone().unwrap();
        assert_eq!(span.start, input.find("Küche").unwrap());
        assert_eq!(span.end, span.start + "Küche".len());
        assert_eq!(&input[span.start..span.end], "Küche");
        assert_eq!(span.raw, "Küche");
        let text = SlotValue::Text("KÜCHE".into());
        assert_eq!(find_span(input, &text), Some(span));
    }

    #[test]
    fn find_span_text_variants() {
        let text = |s: &str| SlotValue::Text(s.into());
        let raw = |input: &str, s: &str| find_span(input, &text(s)).map(|span| span.raw);
        // Plural and singular by a trailing "s".
        assert_eq!(
            raw("turn on the lights", "light").as_deref(),
            Some("lights")
        );
        assert_eq!(raw("turn on the light", "Lights").as_deref(), Some("light"));
        // '_' as ' '.
        assert_eq!(
            raw("lights in the Living Room", "living_room").as_deref(),
            Some("Living Room")
        );
        // Word boundaries preferred, any occurrence as fallback.
        let span = find_span("bathroom and bath", &text("bath")).unwrap();
        assert_eq!((span.start, span.end), (13, 17));
        assert_eq!(raw("the bathroom", "bath").as_deref(), Some("bath"));
        assert_eq!(find_span("the kitchen", &text("garage")), None);
        assert_eq!(find_span("the kitchen", &text("  ")), None);
    }

    #[test]
    fn find_span_numbers() {
        let at = |input: &str, x: f64| {
            find_span(input, &SlotValue::Number(x)).map(|s| (s.start, s.end, s.raw))
        };
        assert_eq!(
            at("set it to 21 degrees", 21.0),
            Some((10, 12, "21".into()))
        );
        assert_eq!(at("dim to 50% please", 50.0), Some((7, 10, "50%".into())));
        assert_eq!(at("make it 21.5", 21.5), Some((8, 12, "21.5".into())));
        assert_eq!(at("auf 21,5 Grad", 21.5), Some((4, 8, "21,5".into())));
        assert_eq!(at("minus 5 outside", -5.0), Some((6, 7, "5".into())));
        assert_eq!(at("go to -5", -5.0), Some((6, 8, "-5".into())));
        // Not inside a longer number or word.
        assert_eq!(at("room 150", 50.0), None);
        assert_eq!(at("2.50 then 50", 50.0), Some((10, 12, "50".into())));
        assert_eq!(at("21.5", 21.0), None);
        assert_eq!(at("a50", 50.0), None);
        assert_eq!(at("fifty", 50.0), None);
    }
}
