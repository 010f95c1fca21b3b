//! `slmd eval`: build a task from labelled rows, run every test row through
//! the real engine one message at a time (as the daemon would), and report
//! accuracy, calibration, abstention and speed ([`metrics::Report`]).
//!
//! Cross-validation (`--cv K`) splits one file into K stratified folds; the
//! engine gets one task per fold, trained on the other folds, so every row
//! is predicted by a head that never saw it. Each distinct example is
//! embedded once across the folds.

pub mod anomaly;
pub mod bench;

pub mod metrics;
pub mod slots;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use metrics::{Outcome, Report};
use slmd_core::examples::{slot_text, Example, Row};
use slmd_engine::{Engine, EngineError, Query, TaskSpec};

/// A task to evaluate: the engine's spec, the rows it is tested on.
pub struct Trial {
    pub spec: TaskSpec,
    pub test: Vec<Row>,
}

/// The task settings `eval` builds tasks with (the configured ones come
/// from the config file instead).
#[derive(Debug, Clone)]
pub struct TaskSettings {
    pub strategy: slmd_engine::Strategy,
    pub instruction: String,
    pub cue: String,
    pub lexical_weight: f32,
    /// Weight of the built-in command concepts.
    pub concept_weight: f32,
    pub abstain_below: f32,
    pub reject_label: Option<String>,
    pub novelty_quantile: f32,
    /// Cross-validation never trains on rows of the reject label: each
    /// fold tests its own out-of-scope rows on a head that has seen none
    /// (`--unseen-oos`).
    pub unseen_oos: bool,
    /// Set for `--kind extract`.
    pub extract: Option<ExtractSettings>,
    /// Rows added to every task's training examples and never tested
    /// (`--extra-train`); those whose intent is not among the training
    /// rows' are left out.
    pub extra: Vec<Row>,
    /// Sentence templates before the model (`--templates`).
    pub templates: Option<slmd_engine::TemplateStage>,
}

/// How extraction tasks are built: the slot schema comes from the training
/// rows ([`slots::infer_schema`]).
#[derive(Debug, Clone)]
pub struct ExtractSettings {
    pub instruction: String,
    pub known: slots::Known,
    /// Slots each intent may fill besides those its training rows fill (an
    /// HA catalogue's intent slots, from `--extra-train`).
    pub intent_slots: BTreeMap<String, Vec<String>>,
}

/// One task trained on `train` and tested on `test`; labels are the distinct
/// intents of the training rows.
pub fn holdout(train: &[Row], test: Vec<Row>, s: &TaskSettings) -> Vec<Trial> {
    vec![Trial {
        spec: spec("holdout", train, s),
        test,
    }]
}

/// How cross-validation deals rows into folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split<'a> {
    /// Row by row, stratified: the usual, optimistic k-fold (a test row's
    /// paraphrases are in training).
    Rows,
    /// Whole groups, one id per row: with [`paraphrase_groups`], a fold's
    /// rows are phrased unlike anything trained, as a new user's often are.
    Groups(&'a [usize]),
}

/// The rows' paraphrase clusters ([`slmd_core::folds::paraphrase_groups`]).
pub fn paraphrase_groups(rows: &[Row]) -> Vec<usize> {
    let texts: Vec<String> = rows.iter().map(|r| r.text.clone()).collect();
    let labels: Vec<String> = rows.iter().map(|r| r.intent.clone()).collect();
    slmd_core::folds::paraphrase_groups(&texts, &labels)
}

/// `k` tasks per seed, one per stratified fold of `rows` under that seed's
/// fold assignment; each seed's trials test every row once, in order.
pub fn cross_validation(
    rows: &[Row],
    k: usize,
    seeds: &[u64],
    s: &TaskSettings,
    split: Split<'_>,
) -> Vec<Trial> {
    let labels: Vec<String> = rows.iter().map(|r| r.intent.clone()).collect();
    let alone: Vec<usize>;
    let (groups, prefix) = match split {
        Split::Rows => {
            alone = (0..rows.len()).collect();
            (alone.as_slice(), "")
        }
        Split::Groups(g) => (g, "grouped-"),
    };
    let several = seeds.len() > 1;
    let mut trials = Vec::with_capacity(k * seeds.len());
    for &seed in seeds {
        let fold_of = slmd_core::folds::grouped_folds(&labels, groups, k, seed);
        for f in 0..k {
            let in_fold = |want: bool| -> Vec<Row> {
                rows.iter()
                    .zip(&fold_of)
                    .filter(|(_, &g)| (g == f) == want)
                    .map(|(r, _)| r.clone())
                    .collect()
            };
            let name = match several {
                true => format!("{prefix}seed{seed}-fold{f}"),
                false => format!("{prefix}fold{f}"),
            };
            let mut train = in_fold(false);
            if s.unseen_oos {
                train.retain(|r| s.reject_label.as_ref() != Some(&r.intent));
            }
            trials.push(Trial {
                spec: spec(&name, &train, s),
                test: in_fold(true),
            });
        }
    }
    trials
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
        examples: train
            .iter()
            .chain(s.extra.iter().filter(|r| labels.contains(&r.intent)))
            .map(|r| Example::from(r.clone()))
            .collect(),
        lexical_weight: s.lexical_weight,
        concept_weight: s.concept_weight,
        concepts: Default::default(),
        abstain_below: s.abstain_below,
        reject_label: s.reject_label.clone(),
        novelty_quantile: s.novelty_quantile,
        extract: s.extract.as_ref().map(|x| slmd_engine::ExtractSpec {
            slots: slots::infer_schema(train, &x.known),
            instruction: x.instruction.clone(),
            label_slots: labels
                .iter()
                .map(|label| {
                    let more = x.intent_slots.get(label)?;
                    let mut names: Vec<String> = train
                        .iter()
                        .filter(|r| &r.intent == label)
                        .flat_map(|r| r.slots.iter().flat_map(|m| m.keys().cloned()))
                        .chain(more.iter().cloned())
                        .collect();
                    names.sort();
                    names.dedup();
                    Some(names)
                })
                .collect(),
        }),
        labels,
        templates: s.templates.clone(),
    }
}

/// What `--extra-train` adds.
#[derive(Debug, Default)]
pub struct Extra {
    pub rows: Vec<Row>,
    /// Rows left out because their text is also evaluated.
    pub dropped: usize,
    /// From a catalogue: each intent's slot names.
    pub intent_slots: BTreeMap<String, Vec<String>>,
}

/// Extra training rows from `path`: labelled JSONL, or (`.yaml`/`.yml`) a
/// Home Assistant intent catalogue (`intents.yaml`), whose intents'
/// `description` and slot combinations' `example` sentences become rows of
/// their intent, without slots, and whose intents' `slots` are kept. Rows whose text (ignoring
/// case) is one of `exclude`'s are dropped, so nothing tested is trained on.
pub fn read_extra(path: &std::path::Path, exclude: &[Row]) -> anyhow::Result<Extra> {
    let is_yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let mut intent_slots = BTreeMap::new();
    let rows = if is_yaml {
        let doc: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(path)?)?;
        let mut rows = Vec::new();
        for (intent, spec) in doc.as_object().into_iter().flatten() {
            if let Some(slots) = spec.get("slots").and_then(|s| s.as_object()) {
                intent_slots.insert(intent.clone(), slots.keys().cloned().collect());
            }
            if let Some(description) = spec.get("description").and_then(|d| d.as_str()) {
                rows.push(Row::new(description.to_owned(), intent.clone()));
            }
            let combos = spec.get("slot_combinations").and_then(|c| c.as_object());
            for combo in combos.into_iter().flat_map(|c| c.values()) {
                let texts: Vec<String> = match combo.get("example") {
                    Some(serde_json::Value::String(s)) => vec![s.clone()],
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    _ => Vec::new(),
                };
                rows.extend(texts.into_iter().map(|text| Row::new(text, intent.clone())));
            }
        }
        rows
    } else {
        slmd_core::examples::read_jsonl(path)?
    };
    let tested: std::collections::HashSet<String> = exclude
        .iter()
        .map(|r| r.text.trim().to_lowercase())
        .collect();
    let before = rows.len();
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| !tested.contains(&r.text.trim().to_lowercase()))
        .collect();
    let dropped = before - rows.len();
    Ok(Extra {
        rows,
        dropped,
        intent_slots,
    })
}

/// Runs every test row of every trial through `engine`, one at a time;
/// the report and each row's outcome.
pub fn run(
    engine: &Engine,
    trials: &[(String, Vec<Row>)],
    reject_label: Option<&str>,
) -> Result<(Report, Vec<Outcome>), EngineError> {
    let total: usize = trials.iter().map(|(_, t)| t.len()).sum();
    let mut progress = Progress::new(total);
    let mut outcomes = Vec::with_capacity(total);
    let started = Instant::now();
    for (task, rows) in trials {
        engine.warm_blocking(task)?;
        for row in rows {
            let t0 = Instant::now();
            let query = Query {
                text: row.text.clone(),
                among: None,
                context: row.context.clone(),
            };
            let scores = engine.infer_blocking(task, query)?;
            let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let (top, confidence) = scores.ranked.first().cloned().unwrap_or_default();
            outcomes.push(Outcome {
                text: row.text.clone(),
                truth: row.intent.clone(),
                abstained: scores.label.is_none() && reject_label != Some(top.as_str()),
                top,
                confidence,
                by: scores.by,
                truth_slots: row
                    .slots
                    .iter()
                    .flatten()
                    .filter(|_| scores.slots.is_some())
                    .filter_map(|(k, v)| Some((k.clone(), slot_text(v)?)))
                    .collect(),
                predicted_slots: scores
                    .slots
                    .iter()
                    .flatten()
                    .map(|s| (s.name.clone(), s.value.to_string()))
                    .collect(),
                latency_ms,
            });
            progress.tick();
        }
    }
    progress.done();
    let report = metrics::report(&outcomes, started.elapsed().as_secs_f64(), reject_label);
    Ok((report, outcomes))
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

/// A file `name` holding `contents` in a new temporary folder (kept while
/// the returned guard lives).
#[cfg(test)]
fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    (dir, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        (0..20)
            .map(|i| Row::new(format!("text {i}"), ["a", "b"][i % 2]))
            .collect()
    }

    fn settings() -> TaskSettings {
        TaskSettings {
            strategy: Default::default(),
            instruction: "i".into(),
            cue: "c".into(),
            lexical_weight: 1.0,
            concept_weight: 0.0,
            abstain_below: 0.0,
            reject_label: None,
            novelty_quantile: 0.0,
            unseen_oos: false,
            extract: None,
            extra: Vec::new(),
            templates: None,
        }
    }

    #[test]
    fn catalogue_examples_become_rows_and_tested_texts_are_dropped() {
        let (_dir, path) = temp_file(
            "intents.yaml",
            "HassTurnOn:\n  supported: true\n  description: Turns on a device\n  slots:\n    name: {}\n    area: {}\n  slot_combinations:\n    name_only:\n      slots: [name]\n      example: \"turn on the lamp\"\n    area:\n      example: [\"lights on in the kitchen\", \"Nevermind\"]\nHassNevermind:\n  slots: {}\n",
        );
        let tested = vec![Row::new("nevermind ", "HassNevermind")];
        let Extra {
            rows: extra,
            dropped,
            intent_slots,
        } = read_extra(&path, &tested).unwrap();
        let mut texts: Vec<&str> = extra.iter().map(|r| r.text.as_str()).collect();
        texts.sort();
        assert_eq!(
            texts,
            [
                "Turns on a device",
                "lights on in the kitchen",
                "turn on the lamp"
            ]
        );
        assert!(extra
            .iter()
            .all(|r| r.intent == "HassTurnOn" && r.slots.is_none()));
        assert_eq!(dropped, 1, "a tested text is never trained on");
        assert_eq!(intent_slots["HassTurnOn"], ["area", "name"]);
        assert!(intent_slots["HassNevermind"].is_empty());

        // Extra rows join every fold's training, only for known intents.
        let mut s = settings();
        s.extra = vec![Row::new("extra a", "a"), Row::new("extra z", "z")];
        for t in cross_validation(&rows(), 5, &[1], &s, Split::Rows) {
            assert!(t.spec.examples.iter().any(|e| e.text == "extra a"));
            assert!(t.spec.examples.iter().all(|e| e.text != "extra z"));
            assert!(t.test.iter().all(|r| !r.text.starts_with("extra")));
        }
    }

    #[test]
    fn several_seeds_repeat_the_folds_each_testing_every_row_once() {
        let rows = rows();
        let trials = cross_validation(&rows, 5, &[1, 2], &settings(), Split::Rows);
        assert_eq!(trials.len(), 10);
        assert_eq!(trials[0].spec.name, "seed1-fold0");
        assert_eq!(trials[9].spec.name, "seed2-fold4");
        for seed in trials.chunks(5) {
            let mut tested: Vec<&str> = seed
                .iter()
                .flat_map(|t| t.test.iter().map(|r| r.text.as_str()))
                .collect();
            tested.sort();
            let mut all: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
            all.sort();
            assert_eq!(tested, all);
        }
        let folds = |trials: &[Trial]| -> Vec<Vec<String>> {
            trials
                .iter()
                .map(|t| t.test.iter().map(|r| r.text.clone()).collect())
                .collect()
        };
        assert_ne!(
            folds(&trials[..5]),
            folds(&trials[5..]),
            "another seed deals other folds"
        );
    }

    #[test]
    fn every_row_is_tested_once_by_a_head_that_never_saw_it() {
        let rows = rows();
        let trials = cross_validation(&rows, 5, &[1], &settings(), Split::Rows);
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
