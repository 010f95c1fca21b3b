//! The note: the detector's facts, the cause the model chose, and one
//! sentence built from exactly those facts.
//!
//! Every number is rounded once, to four significant digits, when the
//! facts are made ([`round_sig`]); the sentence prints the rounded numbers
//! as they are, so each number in it is, digit for digit, a fact.
//! [`ungrounded`] checks that (the evaluation runs it over every note).

use serde::Serialize;

use super::detect::{Firing, Sample};

/// What the detector established. Every number here is already rounded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Facts {
    pub sensor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The reading's time stamp, seconds since the epoch (not rounded).
    pub ts: f64,
    pub value: f64,
    /// The first detector (in configured order) that fired.
    pub detector: String,
    /// Every detector that fired on this reading.
    pub detectors: Vec<String>,
    /// What the value was compared with (see [`Firing::baseline`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// value - baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deviation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// Seconds since the sensor's last normal reading (since its first
    /// reading when none was normal): how long it took to get here, or how
    /// long it has been out of normal.
    pub duration_s: f64,
    /// Anomalies this note stands for: itself and those the cooldown held
    /// back since the sensor's previous note.
    pub count: u32,
    /// Time stamp of the first of those `count` anomalies.
    pub first_ts: f64,
}

/// The published note: the facts as fields, the cause the model chose,
/// the sentence, and which model chose.
#[derive(Debug, Clone, Serialize)]
pub struct Note<'a> {
    /// The reading's id (its own, or derived from topic and payload).
    pub id: String,
    pub task: &'a str,
    #[serde(flatten)]
    pub facts: &'a Facts,
    /// One of the task's labels; `null` when the model abstained or could
    /// not be asked (the facts still go out).
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause_confidence: Option<f32>,
    pub sentence: String,
    pub model: &'a slmd_engine::ModelInfo,
    /// From the reading's arrival to the note.
    pub latency_ms: f64,
}

/// What a note needs besides the firings.
pub struct Context<'a> {
    pub sensor: &'a str,
    pub unit: Option<&'a str>,
    pub sample: Sample,
    pub duration_s: f64,
    pub count: u32,
    pub first_ts: f64,
}

impl Facts {
    /// The facts of the first firing (the others are named in `detectors`).
    /// `None` when nothing fired.
    pub fn new(c: &Context<'_>, fired: &[Firing]) -> Option<Facts> {
        let f = fired.first()?;
        let value = round_sig(c.sample.value);
        let baseline = f.baseline.map(round_sig);
        Some(Facts {
            sensor: c.sensor.to_owned(),
            unit: c.unit.map(str::to_owned),
            ts: c.sample.ts,
            value,
            detector: f.detector.to_owned(),
            detectors: fired.iter().map(|f| f.detector.to_owned()).collect(),
            baseline,
            deviation: f.baseline.map(|b| round_sig(c.sample.value - b)),
            sigma: f.sigma.map(round_sig),
            limit: f.limit.map(round_sig),
            rate_per_s: f.rate_per_s.map(round_sig),
            duration_s: round_sig(c.duration_s.max(0.0)),
            count: c.count,
            first_ts: c.first_ts,
        })
    }

    /// The facts in words, without a cause: what the model classifies, and
    /// the first part of the sentence.
    pub fn describe(&self) -> String {
        let unit = self
            .unit
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        let verb = match self.deviation {
            Some(d) if d > 0.0 => "rose to",
            Some(d) if d < 0.0 => "fell to",
            _ => "read",
        };
        let mut s = format!("{} {verb} {}{unit}", self.sensor, self.value);
        match (self.detector.as_str(), self.baseline, self.deviation) {
            ("rate", Some(b), _) => {
                if let Some(r) = self.rate_per_s {
                    s += &format!(", changing at {}{unit}/s from {b}", r.abs());
                }
            }
            ("threshold", b, _) => {
                if let Some(l) = self.limit {
                    s += &format!(", beyond the limit of {l}");
                }
                if let Some(b) = b {
                    s += &format!(" (baseline {b})");
                }
            }
            (_, Some(b), Some(d)) => {
                let side = if d < 0.0 { "below" } else { "above" };
                s += &format!(", {} {side} its baseline of {b}", d.abs());
                if let Some(z) = self.sigma {
                    s += &format!(" ({z} sigma)");
                }
            }
            _ => {}
        }
        if self.duration_s > 0.0 {
            s += &format!(" within {} s", self.duration_s);
        }
        s
    }

    /// The operator's sentence: the facts, the cause, and the count when
    /// the cooldown merged anomalies into this note.
    pub fn sentence(&self, cause: Option<&str>) -> String {
        let mut s = self.describe();
        match cause {
            Some(c) => s += &format!("; likely cause: {}.", c.replace('_', " ")),
            None => s += "; cause not determined.",
        }
        if self.count > 1 {
            s += &format!(" {} anomalies since the last note.", self.count);
        }
        s
    }

    /// Every number the facts hold (magnitudes), including digits in the
    /// sensor and unit names.
    pub fn numbers(&self) -> Vec<f64> {
        let mut n = vec![
            self.ts,
            self.value,
            self.duration_s,
            f64::from(self.count),
            self.first_ts,
        ];
        n.extend(
            [
                self.baseline,
                self.deviation,
                self.sigma,
                self.limit,
                self.rate_per_s,
            ]
            .into_iter()
            .flatten(),
        );
        n.extend(numbers_in(&self.sensor));
        n.extend(self.unit.iter().flat_map(|u| numbers_in(u)));
        n.into_iter().map(f64::abs).collect()
    }
}

/// `x` to four significant digits (the one rounding of a note's numbers).
pub fn round_sig(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 3 - x.abs().log10().floor() as i32;
    if digits >= 0 {
        let f = 10f64.powi(digits);
        (x * f).round() / f
    } else {
        let f = 10f64.powi(-digits);
        (x / f).round() * f
    }
}

/// The numbers written in `text`, as magnitudes: every run of digits with
/// an optional decimal part (`27.1`, `5`, the `2` of `spindle_2`). A sign
/// is not part of a number here (prose says "below", not "-").
pub fn numbers_in(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
        if let Ok(v) = text[start..i].parse() {
            out.push(v);
        }
    }
    out
}

/// The numbers of `sentence` that are not among the facts (nor in the
/// cause's name); empty when the sentence is grounded.
pub fn ungrounded(sentence: &str, facts: &Facts, cause: Option<&str>) -> Vec<f64> {
    let mut known = facts.numbers();
    known.extend(cause.map(numbers_in).unwrap_or_default());
    numbers_in(sentence)
        .into_iter()
        .filter(|n| !known.contains(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fired: &[Firing], value: f64, count: u32) -> Facts {
        Facts::new(
            &Context {
                sensor: "spindle_2_temp",
                unit: Some("C"),
                sample: Sample {
                    ts: 1_700_000_040.0,
                    value,
                },
                duration_s: 40.0,
                count,
                first_ts: 1_700_000_000.0,
            },
            fired,
        )
        .unwrap()
    }

    fn z(baseline: f64, sigma: f64) -> Firing {
        Firing {
            detector: "zscore",
            baseline: Some(baseline),
            sigma: Some(sigma),
            limit: Some(4.0),
            rate_per_s: None,
        }
    }

    #[test]
    fn rounding_is_four_significant_digits() {
        assert_eq!(round_sig(92.13456), 92.13);
        assert_eq!(round_sig(-0.0643849), -0.06438);
        assert_eq!(round_sig(123456.0), 123500.0);
        assert_eq!(round_sig(0.0), 0.0);
    }

    #[test]
    fn numbers_are_found_without_signs_or_trailing_dots() {
        assert_eq!(
            numbers_in("t_2 fell to -3.5 C, 27 below 65.0 (5.3 sigma) within 40 s."),
            vec![2.0, 3.5, 27.0, 65.0, 5.3, 40.0]
        );
        assert!(numbers_in("no digits.").is_empty());
    }

    #[test]
    fn the_sentence_holds_the_facts_and_nothing_else() {
        let f = facts(&[z(65.01234, 5.3456)], 92.1234, 3);
        assert_eq!(f.value, 92.12);
        assert_eq!(f.baseline, Some(65.01));
        assert_eq!(f.deviation, Some(27.11));
        let s = f.sentence(Some("bearing_wear"));
        assert_eq!(
            s,
            "spindle_2_temp rose to 92.12 C, 27.11 above its baseline of 65.01 (5.346 sigma) \
             within 40 s; likely cause: bearing wear. 3 anomalies since the last note."
        );
        assert!(ungrounded(&s, &f, Some("bearing_wear")).is_empty());
    }

    #[test]
    fn every_detector_kind_gives_a_grounded_sentence() {
        let firings = [
            z(10.0, 4.2),
            Firing {
                detector: "ewma",
                baseline: Some(20.5),
                sigma: Some(6.01),
                limit: Some(3.0),
                rate_per_s: None,
            },
            Firing {
                detector: "rate",
                baseline: Some(50.0),
                sigma: None,
                limit: Some(0.5),
                rate_per_s: Some(-2.75),
            },
            Firing {
                detector: "threshold",
                baseline: None,
                sigma: None,
                limit: Some(95.0),
                rate_per_s: None,
            },
        ];
        for (i, f) in firings.iter().enumerate() {
            for value in [1.0 / 3.0, 97.77777, -12.3456789, 1234567.0] {
                let facts = facts(std::slice::from_ref(f), value, i as u32 + 1);
                for cause in [Some("sensor_fault"), Some("overload_2"), None] {
                    let s = facts.sentence(cause);
                    assert!(
                        ungrounded(&s, &facts, cause).is_empty(),
                        "{s:?} has numbers that are not facts: {:?}",
                        ungrounded(&s, &facts, cause)
                    );
                }
            }
        }
    }

    #[test]
    fn a_number_not_in_the_facts_is_caught() {
        let f = facts(&[z(65.0, 5.0)], 92.0, 1);
        assert_eq!(
            ungrounded("spindle_2_temp rose to 93 C", &f, None),
            vec![93.0]
        );
    }
}
