//! Quantities in a command, read from the text itself (never from the
//! model): "21 degrees" is 21 °C, "seventy fahrenheit" 70 °F, "a bit
//! warmer" a relative step of +1.

use serde::Serialize;

use slmd_engine::numbers::{number_at, separates};

/// What a command asks for, normalised.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Quantity {
    /// An absolute value; `unit` is "°C", "°F", "%" or absent.
    Absolute {
        #[serde(serialize_with = "number")]
        value: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        unit: Option<&'static str>,
    },
    /// A step up or down from the current setting: "a bit warmer" is +1,
    /// "2 degrees lower" -2 °C.
    Relative {
        #[serde(serialize_with = "number")]
        relative: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        unit: Option<&'static str>,
    },
}

/// Whole numbers as JSON integers, as slot values are.
fn number<S: serde::Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    slmd_engine::schema::SlotValue::Number(*x).serialize(s)
}

impl Quantity {
    /// The value in °C when it is a temperature in °C or °F.
    pub fn celsius(&self) -> Option<f64> {
        match self {
            Quantity::Absolute {
                value,
                unit: Some("°C"),
            } => Some(*value),
            Quantity::Absolute {
                value,
                unit: Some("°F"),
            } => Some(((value - 32.0) * 5.0 / 9.0 * 10.0).round() / 10.0),
            _ => None,
        }
    }

    /// The absolute value, whatever its unit.
    pub fn value(&self) -> Option<f64> {
        match self {
            Quantity::Absolute { value, .. } => Some(*value),
            Quantity::Relative { .. } => None,
        }
    }
}

const UP: &[&str] = &[
    "warmer", "hotter", "higher", "up", "increase", "raise", "more", "louder", "faster",
];
const DOWN: &[&str] = &[
    "cooler", "colder", "lower", "down", "decrease", "reduce", "less", "quieter", "slower",
];

/// The first number in `text` with its unit (a step when the text also
/// says up or down), else a relative step of 1, else `None`. A bare number
/// in a sentence about temperature counts as °C.
pub fn read(text: &str) -> Option<Quantity> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split(separates).filter(|w| !w.is_empty()).collect();
    let has = |set: &[&str]| words.iter().any(|w| set.contains(w));
    let step = match (has(UP), has(DOWN)) {
        (true, false) => Some(1.0),
        (false, true) => Some(-1.0),
        _ => None,
    };
    for i in 0..words.len() {
        let Some((value, used)) = number_at(&words[i..]) else {
            continue;
        };
        let rest = &words[i + used..];
        let glued = words[i].trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        let unit = unit_of(glued, rest).or_else(|| {
            let temperature = ["temperature", "temp", "degrees", "heat", "climate"];
            lower
                .split_whitespace()
                .any(|w| temperature.contains(&w))
                .then_some("°C")
        });
        return Some(match step {
            Some(sign) => Quantity::Relative {
                relative: sign * value,
                unit,
            },
            None => Quantity::Absolute { value, unit },
        });
    }
    step.map(|relative| Quantity::Relative {
        relative,
        unit: None,
    })
}

fn unit_of(glued: &str, rest: &[&str]) -> Option<&'static str> {
    let next = rest.first().copied().unwrap_or("");
    let after = rest.get(1).copied().unwrap_or("");
    let word = if glued.is_empty() { next } else { glued };
    match word.trim_end_matches('.') {
        "%" | "percent" | "per" if word != "per" || after == "cent" => Some("%"),
        "°f" | "f" | "fahrenheit" => Some("°F"),
        "°c" | "c" | "celsius" | "centigrade" => Some("°C"),
        "degree" | "degrees" | "°" => Some(match after {
            "fahrenheit" | "f" => "°F",
            _ => "°C",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abs(value: f64, unit: Option<&'static str>) -> Option<Quantity> {
        Some(Quantity::Absolute { value, unit })
    }

    #[test]
    fn numbers_and_units_are_normalised() {
        assert_eq!(
            read("set the temperature to 21 degrees"),
            abs(21.0, Some("°C"))
        );
        assert_eq!(read("set the temperature to 21"), abs(21.0, Some("°C")));
        assert_eq!(read("make it twenty one degrees"), abs(21.0, Some("°C")));
        assert_eq!(read("heat to 70 fahrenheit"), abs(70.0, Some("°F")));
        let step = |relative, unit| Some(Quantity::Relative { relative, unit });
        assert_eq!(
            read("1 fahrenheit degrees higher please"),
            step(1.0, Some("°F"))
        );
        assert_eq!(read("two degrees lower"), step(-2.0, Some("°C")));
        assert_eq!(read("21.5°C please"), abs(21.5, Some("°C")));
        assert_eq!(read("fan to 40 percent"), abs(40.0, Some("%")));
        assert_eq!(read("fan to 40%"), abs(40.0, Some("%")));
        assert_eq!(read("volume to one hundred"), abs(100.0, None));
        assert_eq!(read("open the window"), None);
    }

    #[test]
    fn relative_steps() {
        let step = |relative| {
            Some(Quantity::Relative {
                relative,
                unit: None,
            })
        };
        assert_eq!(read("a bit warmer"), step(1.0));
        assert_eq!(read("make it cooler please"), step(-1.0));
        assert_eq!(read("turn the fan down"), step(-1.0));
        assert_eq!(read("up and down"), None, "contradictory");
    }

    #[test]
    fn fahrenheit_converts_for_range_checks() {
        assert_eq!(abs(70.0, Some("°F")).unwrap().celsius(), Some(21.1));
        assert_eq!(abs(95.0, Some("°C")).unwrap().celsius(), Some(95.0));
        assert_eq!(abs(40.0, Some("%")).unwrap().celsius(), None);
    }
}
