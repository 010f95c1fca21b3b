//! `slmd eval`: build a task from labelled rows, run every test row through
//! the real engine one message at a time (as the daemon would), and report
//! accuracy, calibration, abstention and speed ([`metrics::Report`]).
//!
//! Cross-validation (`--cv K`) splits one file into K stratified folds; the
//! engine gets one task per fold, trained on the other folds, so every row
//! is predicted by a head that never saw it. Each distinct example is
//! embedded once across the folds.

pub mod bench;
pub mod folds;
pub mod metrics;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::engine::{Engine, EngineError, TaskSpec};
use crate::examples::{Example, Row};
use metrics::{Outcome, Report};

/// A task to evaluate: the engine's spec, the rows it is tested on.
pub struct Trial {
    pub spec: TaskSpec,
    pub test: Vec<Row>,
}

/// The task settings `eval` builds tasks with (the configured ones come
/// from the config file instead).
#[derive(Debug, Clone)]
pub struct TaskSettings {
    pub strategy: crate::engine::Strategy,
    pub instruction: String,
    pub cue: String,
    pub lexical_weight: f32,
    pub abstain_below: f32,
    pub reject_label: Option<String>,
}

/// One task trained on `train` and tested on `test`; labels are the distinct
/// intents of the training rows.
pub fn holdout(train: &[Row], test: Vec<Row>, s: &TaskSettings) -> Vec<Trial> {
    vec![Trial {
        spec: spec("holdout", train, s),
        test,
    }]
}

/// `k` tasks, one per stratified fold of `rows`.
pub fn cross_validation(rows: &[Row], k: usize, seed: u64, s: &TaskSettings) -> Vec<Trial> {
    let labels: Vec<String> = rows.iter().map(|r| r.intent.clone()).collect();
    let fold_of = folds::stratified_folds(&labels, k, seed);
    (0..k)
        .map(|f| {
            let in_fold = |want: bool| -> Vec<Row> {
                rows.iter()
                    .zip(&fold_of)
                    .filter(|(_, &g)| (g == f) == want)
                    .map(|(r, _)| r.clone())
                    .collect()
            };
            Trial {
                spec: spec(&format!("fold{f}"), &in_fold(false), s),
                test: in_fold(true),
            }
        })
        .collect()
}

fn spec(name: &str, train: &[Row], s: &TaskSettings) -> TaskSpec {
    let mut labels: Vec<String> = train.iter().map(|r| r.intent.clone()).collect();
    labels.sort();
    labels.dedup();
    TaskSpec {
        name: name.into(),
        strategy: s.strategy,
        instruction: s.instruction.clone(),
        cue: s.cue.clone(),
        labels,
        examples: train
            .iter()
            .map(|r| Example {
                text: r.text.clone(),
                label: r.intent.clone(),
            })
            .collect(),
        lexical_weight: s.lexical_weight,
        abstain_below: s.abstain_below,
        reject_label: s.reject_label.clone(),
    }
}

/// Runs every test row of every trial through `engine`, one at a time.
pub fn run(
    engine: &Engine,
    trials: &[(String, Vec<Row>)],
    reject_label: Option<&str>,
) -> Result<Report, EngineError> {
    let total: usize = trials.iter().map(|(_, t)| t.len()).sum();
    let mut progress = Progress::new(total);
    let mut outcomes = Vec::with_capacity(total);
    let started = Instant::now();
    for (task, rows) in trials {
        for row in rows {
            let t0 = Instant::now();
            let scores = engine.classify_blocking(task, row.text.clone())?;
            let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let (top, confidence) = scores.ranked[0].clone();
            outcomes.push(Outcome {
                truth: row.intent.clone(),
                top,
                confidence,
                abstained: scores.label.is_none()
                    && reject_label != Some(scores.ranked[0].0.as_str()),
                truth_slots: BTreeMap::new(),
                predicted_slots: BTreeMap::new(),
                latency_ms,
            });
            progress.tick();
        }
    }
    progress.done();
    Ok(metrics::report(
        &outcomes,
        started.elapsed().as_secs_f64(),
        reject_label,
    ))
}

/// A one-line progress bar on stderr, drawn only on a terminal.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if !self.tty {
            return;
        }
        let width = 30;
        let filled = width * self.done / self.total.max(1);
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        eprint!(
            "\r[{}{}] {}/{} ({:.1}/s)",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.done,
            self.total,
            rate
        );
        let _ = std::io::stderr().flush();
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        (0..20)
            .map(|i| Row {
                text: format!("text {i}"),
                intent: ["a", "b"][i % 2].into(),
            })
            .collect()
    }

    fn settings() -> TaskSettings {
        TaskSettings {
            strategy: Default::default(),
            instruction: "i".into(),
            cue: "c".into(),
            lexical_weight: 1.0,
            abstain_below: 0.0,
            reject_label: None,
        }
    }

    #[test]
    fn every_row_is_tested_once_by_a_head_that_never_saw_it() {
        let rows = rows();
        let trials = cross_validation(&rows, 5, 1, &settings());
        assert_eq!(trials.len(), 5);
        let tested: usize = trials.iter().map(|t| t.test.len()).sum();
        assert_eq!(tested, rows.len());
        for t in &trials {
            for r in &t.test {
                assert!(t.spec.examples.iter().all(|e| e.text != r.text));
            }
            assert_eq!(t.spec.examples.len() + t.test.len(), rows.len());
            assert_eq!(t.spec.labels, vec!["a".to_string(), "b".to_string()]);
        }
    }
}
