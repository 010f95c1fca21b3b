//! `slmd eval --kind anomaly`: detection precision and recall of detector
//! settings on labelled windows (the NAB dev rows) and on a labelled series
//! (a CSV and its fault intervals), and the number-grounding check of every
//! note those settings produce.
//!
//! NAB rows summarise a window of a series in text: the preceding
//! baseline's mean and standard deviation and a 24-bin trace of bin means.
//! Each row is replayed as 24 readings (one per bin, time stamps spread
//! over the window) into a fresh sensor primed with the preceding baseline
//! ([`SensorDetector::prime`]); the row counts as "anomaly" when any reading
//! is anomalous. Bin means smooth short spikes away, and the rows' raw
//! minimum and maximum are not used, so this measures the detectors on
//! what the rows give, not on the raw series. Rate limits of the NAB grid
//! are in baseline standard deviations per bin (the series have different
//! scales); the series grid's are in the series' units per second.
//!
//! On the series a note is a true positive when its time stamp lies in a
//! fault interval or up to `GRACE_SECS` after it (the return to normal is
//! part of the fault); precision is over notes (after the cooldown), recall
//! over faults.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::eval::metrics::{harmonic, ratio};
use crate::replay;
use slmd::monitor::detect::SensorDetector;
use slmd::monitor::note::{ungrounded, Facts};
use slmd::monitor::reading::{parse_time, Reading};
use slmd::monitor::settings::{DetectorConfig, MonitorConfig};
use slmd::monitor::{TaskMonitor, Verdict};
use slmd_core::examples::Row;
use slmd_engine::Engine;

/// After a fault interval, notes this late still belong to it.
pub const GRACE_SECS: f64 = 120.0;

#[derive(Debug, thiserror::Error)]
pub enum AnomalyEvalError {
    #[error("row {row}: {message}")]
    Row { row: usize, message: String },
    #[error("{path}: {message}")]
    Faults { path: String, message: String },
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
    #[error(transparent)]
    Engine(#[from] slmd_engine::EngineError),
}

/// One NAB dev row, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct NabWindow {
    pub series: String,
    pub anomaly: bool,
    pub start: f64,
    pub end: f64,
    pub base_mean: f64,
    pub base_std: f64,
    pub trace: Vec<f64>,
}

fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses a row of `nab_windows.jsonl`.
pub fn parse_nab(i: usize, row: &Row) -> Result<NabWindow, AnomalyEvalError> {
    let bad = |message: &str| AnomalyEvalError::Row {
        row: i + 1,
        message: message.to_owned(),
    };
    let t = &row.text;
    let base_mean =
        number_after(t, "preceding baseline mean ").ok_or_else(|| bad("no baseline mean"))?;
    let after_base = &t[t.find("preceding baseline mean ").unwrap_or(0)..];
    let base_std = number_after(after_base, " std ").ok_or_else(|| bad("no baseline std"))?;
    let trace_at = t.find("bins): [").ok_or_else(|| bad("no trace"))? + "bins): [".len();
    let trace_end = t[trace_at..]
        .find(']')
        .ok_or_else(|| bad("trace not closed"))?;
    let trace = t[trace_at..trace_at + trace_end]
        .split(',')
        .map(|c| c.trim().parse::<f64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("bad trace value"))?;
    let slot = |k: &str| {
        row.slots
            .as_ref()
            .and_then(|s| s.get(k))
            .and_then(|v| v.as_str())
            .and_then(parse_time)
    };
    let (start, end) = (
        slot("start").ok_or_else(|| bad("no slots.start"))?,
        slot("end").ok_or_else(|| bad("no slots.end"))?,
    );
    let series = t
        .strip_prefix("series ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("series")
        .to_owned();
    if trace.is_empty() || end <= start {
        return Err(bad("empty trace or window"));
    }
    Ok(NabWindow {
        series,
        anomaly: row.intent == "anomaly",
        start,
        end,
        base_mean,
        base_std,
        trace,
    })
}

/// A labelled fault of the series.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub kind: String,
    pub start: f64,
    pub end: f64,
}

/// `kind,start,end` CSV with a header (time stamps as `slmd replay` reads).
pub fn read_faults(path: &Path) -> Result<Vec<Fault>, AnomalyEvalError> {
    let bad = |message: String| AnomalyEvalError::Faults {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split(',').map(str::trim).collect();
            match c.as_slice() {
                [kind, a, b] => match (parse_time(a), parse_time(b)) {
                    (Some(start), Some(end)) if end >= start => Ok(Fault {
                        kind: (*kind).to_owned(),
                        start,
                        end,
                    }),
                    _ => Err(bad(format!("bad interval in {l:?}"))),
                },
                _ => Err(bad(format!("expected kind,start,end: {l:?}"))),
            }
        })
        .collect()
}

/// A named list of detectors.
#[derive(Debug, Clone)]
pub struct Setting {
    pub name: String,
    pub detectors: Vec<DetectorConfig>,
}

fn setting(name: &str, detectors: Vec<DetectorConfig>) -> Setting {
    Setting {
        name: name.into(),
        detectors,
    }
}

/// One setting per z-score `k`, per EWMA `(alpha, k)` and per rate limit
/// (named with `rate_unit`).
fn grid(zs: &[f64], ewmas: &[(f64, f64)], rates: &[f64], rate_unit: &str) -> Vec<Setting> {
    let z = zs
        .iter()
        .map(|&k| setting(&format!("zscore k={k}"), vec![DetectorConfig::Zscore { k }]));
    let ewma = ewmas.iter().map(|&(alpha, k)| {
        let name = format!("ewma alpha={alpha} k={k}");
        setting(&name, vec![DetectorConfig::Ewma { alpha, k }])
    });
    let rate = rates.iter().map(|&r| {
        let name = format!("rate {r}{rate_unit}");
        setting(&name, vec![DetectorConfig::Rate { max_per_sec: r }])
    });
    z.chain(ewma).chain(rate).collect()
}

/// The NAB grid (rate limits in baseline sigmas per bin).
pub fn nab_grid() -> Vec<Setting> {
    let ewmas = [(0.1, 3.0), (0.1, 5.0), (0.3, 3.0), (0.3, 5.0)];
    grid(
        &[2.0, 3.0, 4.0, 5.0],
        &ewmas,
        &[1.0, 2.0, 3.0],
        " sigma/bin",
    )
}

/// The series grid (the spindle series is in C, one reading per 10 s).
pub fn series_grid() -> Vec<Setting> {
    let ewmas = [(0.1, 4.0), (0.1, 6.0), (0.3, 4.0), (0.3, 6.0)];
    let mut g = grid(&[3.0, 4.0, 5.0, 6.0], &ewmas, &[0.1, 0.2, 0.5], "/s");
    g.push(setting(
        "threshold max=80",
        vec![DetectorConfig::Threshold {
            min: None,
            max: Some(80.0),
        }],
    ));
    g
}

/// Precision, recall and F1 of one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub setting: String,
    pub tp: usize,
    pub fp: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Series only: the kinds of the faults it caught.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detected: Vec<String>,
    /// Series only: notes published (after the cooldown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<usize>,
}

fn score(
    setting: &str,
    tp: usize,
    fp: usize,
    fn_: usize,
    recall_hits: usize,
    recall_of: usize,
) -> Score {
    let precision = ratio(tp, tp + fp);
    let recall = ratio(recall_hits, recall_of);
    let f1 = harmonic(precision, recall);
    Score {
        setting: setting.into(),
        tp,
        fp,
        fn_,
        precision,
        recall,
        f1,
        detected: Vec::new(),
        notes: None,
    }
}

/// The grounding check over every note.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Grounding {
    pub notes: usize,
    /// Notes whose sentence holds a number that is not a fact.
    pub ungrounded: usize,
    /// The model's cause choices, by label (`none` when it abstained).
    pub causes: BTreeMap<String, usize>,
    /// The model that chose the causes (`None`: not asked).
    pub model: Option<String>,
    /// A few sentences, to read.
    pub samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub nab_rows: usize,
    pub nab_anomalies: usize,
    pub nab: Vec<Score>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<SeriesReport>,
    pub grounding: Grounding,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeriesReport {
    pub file: String,
    pub readings: usize,
    pub faults: Vec<String>,
    pub settings: Vec<Score>,
}

/// The labelled series and, optionally, the configured monitor to add as
/// a setting named "configured".
pub struct Series<'a> {
    pub file: &'a Path,
    pub faults: &'a Path,
    pub configured: Option<&'a MonitorConfig>,
}

/// Where causes come from: the engine and the task name.
pub struct Causes<'a> {
    pub engine: &'a Engine,
    pub task: &'a str,
}

struct Checker<'a> {
    causes: Option<Causes<'a>>,
    g: Grounding,
}

impl Checker<'_> {
    fn check(&mut self, facts: &Facts) -> Result<(), AnomalyEvalError> {
        let cause = match &self.causes {
            Some(c) => c.engine.infer_blocking(c.task, facts.describe())?.label,
            None => None,
        };
        let sentence = facts.sentence(cause.as_deref());
        self.g.notes += 1;
        if !ungrounded(&sentence, facts, cause.as_deref()).is_empty() {
            self.g.ungrounded += 1;
            self.g.samples.push(format!("UNGROUNDED: {sentence}"));
        } else if self.g.samples.len() < 6 && self.g.notes % 40 == 1 {
            self.g.samples.push(sentence);
        }
        *self
            .g
            .causes
            .entry(cause.unwrap_or_else(|| "none".into()))
            .or_default() += 1;
        Ok(())
    }
}

fn monitor(
    detectors: Vec<DetectorConfig>,
    window: usize,
    min: usize,
    cooldown: f64,
) -> TaskMonitor {
    TaskMonitor::new(MonitorConfig {
        sensor_pointer: "/sensor".into(),
        value_pointer: "/value".into(),
        unit_pointer: "/unit".into(),
        ts_pointer: "/ts".into(),
        window,
        min_samples: min,
        min_std: 0.0,
        unit: None,
        detectors,
        cooldown_secs: cooldown,
        max_sensors: 1,
        sensors: Default::default(),
    })
}

/// Scores the grids; every note goes through the grounding check (with a
/// cause from the model when `causes` is given).
pub fn run(
    nab: &[NabWindow],
    series: Option<Series<'_>>,
    causes: Option<Causes<'_>>,
) -> Result<Report, AnomalyEvalError> {
    let mut checker = Checker {
        g: Grounding {
            model: causes.as_ref().map(|c| c.engine.model.name.clone()),
            ..Default::default()
        },
        causes,
    };
    let mut nab_scores = Vec::new();
    for s in nab_grid() {
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for w in nab {
            let bin = (w.end - w.start) / w.trace.len() as f64;
            // Rate limits are in baseline sigmas per bin here.
            let detectors = s
                .detectors
                .iter()
                .map(|d| match *d {
                    DetectorConfig::Rate { max_per_sec } => DetectorConfig::Rate {
                        max_per_sec: (max_per_sec * w.base_std / bin).max(f64::MIN_POSITIVE),
                    },
                    ref other => other.clone(),
                })
                .collect();
            // One window is one verdict: the cooldown spans it.
            let mut m = monitor(detectors, 8, 8, f64::INFINITY);
            let mut flagged = false;
            for (i, &value) in w.trace.iter().enumerate() {
                let r = Reading {
                    sensor: w.series.clone(),
                    value,
                    unit: None,
                    ts: w.start + i as f64 * bin,
                };
                let prime = |d: &mut SensorDetector| d.prime(w.base_mean, w.base_std);
                match m.observe_with(&r, prime) {
                    Ok(Verdict::Normal) => {}
                    Ok(Verdict::Held) => flagged = true,
                    Ok(Verdict::Note(f)) => {
                        flagged = true;
                        checker.check(&f)?;
                    }
                    Err(e) => unreachable!("readings made here are well-formed: {e}"),
                }
            }
            match (flagged, w.anomaly) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fn_ += 1,
                (false, false) => {}
            }
        }
        nab_scores.push(score(&s.name, tp, fp, fn_, tp, tp + fn_));
    }
    let series = match series {
        None => None,
        Some(sr) => Some(run_series(&sr, &mut checker)?),
    };
    Ok(Report {
        nab_rows: nab.len(),
        nab_anomalies: nab.iter().filter(|w| w.anomaly).count(),
        nab: nab_scores,
        series,
        grounding: checker.g,
    })
}

fn run_series(s: &Series<'_>, checker: &mut Checker<'_>) -> Result<SeriesReport, AnomalyEvalError> {
    let rows = replay::read(s.file, None)?;
    let faults = read_faults(s.faults)?;
    let mut settings: Vec<(String, TaskMonitor)> = series_grid()
        .into_iter()
        .map(|g| (g.name, monitor(g.detectors, 60, 20, 300.0)))
        .collect();
    if let Some(c) = s.configured {
        settings.push(("configured".into(), TaskMonitor::new(c.clone())));
    }
    let mut scores = Vec::new();
    for (name, mut m) in settings {
        let mut notes = Vec::new();
        for row in &rows {
            let r = Reading {
                sensor: row.sensor.clone(),
                value: row.value,
                unit: None,
                ts: row.ts,
            };
            if let Verdict::Note(f) = m.observe(&r).map_err(|e| AnomalyEvalError::Row {
                row: 0,
                message: e.to_string(),
            })? {
                checker.check(&f)?;
                notes.push(f.ts);
            }
        }
        let in_fault = |ts: f64, f: &Fault| ts >= f.start && ts <= f.end + GRACE_SECS;
        let tp = notes
            .iter()
            .filter(|&&ts| faults.iter().any(|f| in_fault(ts, f)))
            .count();
        let detected: Vec<String> = faults
            .iter()
            .filter(|f| notes.iter().any(|&ts| in_fault(ts, f)))
            .map(|f| f.kind.clone())
            .collect();
        let mut sc = score(
            &name,
            tp,
            notes.len() - tp,
            faults.len() - detected.len(),
            detected.len(),
            faults.len(),
        );
        sc.detected = detected;
        sc.notes = Some(notes.len());
        scores.push(sc);
    }
    Ok(SeriesReport {
        file: s.file.display().to_string(),
        readings: rows.len(),
        faults: faults.iter().map(|f| f.kind.clone()).collect(),
        settings: scores,
    })
}

impl Report {
    /// Markdown tables.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "NAB windows: {} rows, {} labelled anomaly (a row is flagged when any of its 24 bins is anomalous)\n\n\
             | setting | TP | FP | FN | precision | recall | F1 |\n|---|---|---|---|---|---|---|\n",
            self.nab_rows, self.nab_anomalies
        );
        for s in &self.nab {
            t += &format!(
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |\n",
                s.setting, s.tp, s.fp, s.fn_, s.precision, s.recall, s.f1
            );
        }
        if let Some(sr) = &self.series {
            t += &format!(
                "\nSeries {}: {} readings, faults {} (precision over notes, recall over faults)\n\n\
                 | setting | notes | true notes | precision | faults caught | recall | F1 | caught |\n\
                 |---|---|---|---|---|---|---|---|\n",
                sr.file,
                sr.readings,
                sr.faults.join(", ")
            );
            for s in &sr.settings {
                t += &format!(
                    "| {} | {} | {} | {:.2} | {}/{} | {:.2} | {:.2} | {} |\n",
                    s.setting,
                    s.notes.unwrap_or(0),
                    s.tp,
                    s.precision,
                    s.detected.len(),
                    sr.faults.len(),
                    s.recall,
                    s.f1,
                    s.detected.join(", ")
                );
            }
        }
        let g = &self.grounding;
        t += &format!(
            "\nGrounding: {} notes, {} with a number that is not a fact; causes by {}: {}\n",
            g.notes,
            g.ungrounded,
            g.model.as_deref().unwrap_or("(model not asked)"),
            g.causes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for s in &g.samples {
            t += &format!("  - {s}\n");
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str, intent: &str) -> Row {
        serde_json::from_value(serde_json::json!({
            "text": text, "intent": intent,
            "slots": {"start": "2014-04-10 07:15:00", "end": "2014-04-11 16:45:00"}
        }))
        .unwrap()
    }

    const TEXT: &str = "series art_x (artificialWithAnomaly), 2014-04-10 07:15:00 to 2014-04-11 16:45:00, \
        403 samples. window mean 36.96 min -21.87 max 87.96 std 33.71; preceding baseline mean 7.058 \
        std 43.31; peak deviation 1.868 sigma. trace(24 bins): [-19.71, 37.27, 300.0, 40.0]";

    #[test]
    fn a_nab_row_parses() {
        let w = parse_nab(0, &row(TEXT, "anomaly")).unwrap();
        assert_eq!(w.series, "art_x");
        assert!(w.anomaly);
        assert_eq!((w.base_mean, w.base_std), (7.058, 43.31));
        assert_eq!(w.trace, vec![-19.71, 37.27, 300.0, 40.0]);
        assert_eq!(w.end - w.start, 33.0 * 3600.0 + 1800.0);
        assert!(parse_nab(0, &row("series y, no numbers", "normal")).is_err());
    }

    #[test]
    fn the_grid_scores_a_flagged_window() {
        let anomalous = parse_nab(0, &row(TEXT, "anomaly")).unwrap();
        let calm = NabWindow {
            anomaly: false,
            trace: vec![7.0; 24],
            ..anomalous.clone()
        };
        let r = run(&[anomalous, calm], None, None).unwrap();
        let z2 = r.nab.iter().find(|s| s.setting == "zscore k=2").unwrap();
        // 300 is 6.8 sigma from the primed baseline; the flat window never fires.
        assert_eq!((z2.tp, z2.fp, z2.fn_), (1, 0, 0));
        assert_eq!(r.grounding.ungrounded, 0);
        assert!(r.grounding.notes >= 1);
    }
}
