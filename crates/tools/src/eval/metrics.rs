//! Scores for one evaluation run: accuracy, per-label P/R/F1, confusion,
//! calibration, slot extraction and latency.
//!
//! Vocabulary used throughout:
//! - The *predicted label* of a row is `None` ("not recognised") when the
//!   daemon abstained, or when its best label is the reject label (e.g.
//!   `"oos"`); otherwise it is `Some(top)`.
//! - A row whose true label is the reject label is *out of scope*. It is
//!   correct iff its predicted label is `None`. Any other row is *in scope* and
//!   correct iff its predicted label is `Some(truth)`.
//!
//! Rates over an empty set of rows are `0.0` for plain numbers and `None`
//! (JSON `null`) for optional ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use slmd_core::examples::slot_values_match;

/// Name of the confusion-matrix column counting abstentions.
pub const ABSTAIN_COLUMN: &str = "(abstain)";

/// One evaluated row (also what `slmd eval --predictions` writes, a line
/// each).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The row's input.
    pub text: String,
    /// The true label.
    pub truth: String,
    /// The model's best label (even when it abstained).
    pub top: String,
    /// Probability of `top`, in `[0, 1]`.
    pub confidence: f32,
    /// True when the daemon reported "not recognised".
    pub abstained: bool,
    /// Expected slot values, by slot name.
    pub truth_slots: BTreeMap<String, String>,
    /// Extracted slot values, by slot name.
    pub predicted_slots: BTreeMap<String, String>,
    /// Time to answer this row, in milliseconds.
    pub latency_ms: f64,
    /// The stage that answered.
    pub by: slmd_engine::Stage,
}

/// Precision, recall and F1 of one label (never the reject label).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: String,
    /// Rows predicted as this label that truly are it / rows predicted as it
    /// (0 when nothing was predicted as it).
    pub precision: f64,
    /// Rows truly of this label predicted as it / rows truly of it (0 when
    /// it never occurs as truth).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
    /// Number of rows whose true label is this one.
    pub support: usize,
}

/// Confusion matrix: `matrix[i][j]` counts rows with true label `rows[i]`
/// that landed in column `labels[j]`.
///
/// Columns are the sorted union of true labels and the best labels of rows
/// that did not abstain (the reject label included), followed by
/// [`ABSTAIN_COLUMN`]. A row that abstained goes to the abstain column; any
/// other row goes to its best label's column, so a row answered with the
/// reject label is counted under the reject label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confusion {
    /// Column names, the last one being [`ABSTAIN_COLUMN`].
    pub labels: Vec<String>,
    /// Row names: the sorted true labels.
    pub rows: Vec<String>,
    /// `rows.len()` rows of `labels.len()` counts.
    pub matrix: Vec<Vec<usize>>,
}

/// Scores of one evaluation run. See the module documentation for what
/// "predicted label", "out of scope" and "correct" mean.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Number of rows.
    pub n: usize,
    /// Correct rows / all rows.
    pub accuracy: f64,
    /// Correct rows / in-scope rows; `None` when there are no in-scope rows.
    pub in_scope_accuracy: Option<f64>,
    /// Mean F1 over the labels that occur as truth (reject label excluded).
    pub macro_f1: f64,
    /// Rows with predicted label `None` / all rows.
    pub abstain_rate: f64,
    /// In-scope rows with predicted label `None` / in-scope rows; `None` when
    /// there are no in-scope rows.
    pub in_scope_abstain_rate: Option<f64>,
    /// Out-of-scope rows with predicted label `None` / out-of-scope rows;
    /// `None` without a reject label or without out-of-scope rows.
    pub oos_rejection: Option<f64>,
    /// Expected calibration error of the raw top-1 confidence: 10 equal-width
    /// bins over `[0, 1]` (1.0 falls in the last), summing
    /// `bin share × |mean confidence − fraction with top == truth|`.
    /// Abstention is ignored here.
    pub ece: f64,
    /// Matching predicted slot pairs / predicted slot pairs. Slot values match
    /// after trimming, lowercasing and collapsing inner whitespace, or
    /// numerically when both parse as numbers. `None` for a run with no truth
    /// and no predicted slots at all.
    pub slot_precision: Option<f64>,
    /// Matching predicted slot pairs / truth slot pairs.
    pub slot_recall: Option<f64>,
    /// Harmonic mean of slot precision and recall.
    pub slot_f1: Option<f64>,
    /// Median latency (nearest rank).
    pub p50_ms: f64,
    /// 95th percentile latency (nearest rank: sorted[ceil(0.95 n) - 1]).
    pub p95_ms: f64,
    /// Mean latency.
    pub mean_ms: f64,
    /// Rows / wall-clock seconds (0 when the wall time is not positive).
    pub throughput_per_s: f64,
    /// Per-label scores, sorted by label.
    pub per_label: Vec<LabelScore>,
    pub confusion: Confusion,
    /// With several fold seeds (`slmd eval --cv K --seed 1,2,3`): the scores
    /// of each seed's cross-validation alone. The fields above pool every
    /// seed's rows, so `accuracy` is the mean of the seeds' accuracies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_seed: Vec<SeedScore>,
    /// With a template stage: the rows each stage answered, and how well.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_stage: Vec<StageScore>,
    /// With `--cv`: the same task cross-validated with whole paraphrase
    /// clusters held out and (with a reject label) no out-of-scope row
    /// trained: the estimate for phrasing and out-of-scope text the task
    /// has never seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realistic: Option<Realistic>,
}

/// The realistic estimate beside the k-fold one.
#[derive(Debug, Clone, Serialize)]
pub struct Realistic {
    /// Paraphrase clusters the rows fall into (a row alone counts as one).
    pub clusters: usize,
    pub accuracy: f64,
    pub in_scope_accuracy: Option<f64>,
    pub oos_rejection: Option<f64>,
}

/// The rows one stage of a cascade answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageScore {
    pub stage: slmd_engine::Stage,
    pub rows: usize,
    /// Of all rows.
    pub share: f64,
    /// On its own rows.
    pub accuracy: f64,
    pub slot_f1: Option<f64>,
    pub p50_ms: f64,
}

/// Each stage's share and scores; empty when the model answered every row.
pub fn per_stage(outcomes: &[Outcome], reject_label: Option<&str>) -> Vec<StageScore> {
    use slmd_engine::Stage;
    if outcomes.iter().all(|o| o.by == Stage::Model) {
        return Vec::new();
    }
    [Stage::Template, Stage::Model]
        .into_iter()
        .map(|stage| {
            let own: Vec<Outcome> = outcomes.iter().filter(|o| o.by == stage).cloned().collect();
            let r = report(&own, 0.0, reject_label);
            StageScore {
                stage,
                rows: own.len(),
                share: ratio(own.len(), outcomes.len()),
                accuracy: r.accuracy,
                slot_f1: r.slot_f1,
                p50_ms: r.p50_ms,
            }
        })
        .collect()
}

/// One fold seed's share of a repeated cross-validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedScore {
    pub seed: u64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub in_scope_accuracy: Option<f64>,
    pub oos_rejection: Option<f64>,
    pub slot_f1: Option<f64>,
}

impl SeedScore {
    pub fn new(seed: u64, r: &Report) -> SeedScore {
        SeedScore {
            seed,
            accuracy: r.accuracy,
            macro_f1: r.macro_f1,
            in_scope_accuracy: r.in_scope_accuracy.filter(|_| r.oos_rejection.is_some()),
            oos_rejection: r.oos_rejection,
            slot_f1: r.slot_f1,
        }
    }
}

/// `num / den`, or 0 when `den` is 0.
pub(crate) fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// `num / den`, or `None` when `den` is 0.
fn opt_ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Harmonic mean, 0 when both inputs are 0.
pub(crate) fn harmonic(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// The predicted label: `None` when abstained or answered with the reject label.
fn predicted<'a>(o: &'a Outcome, reject: Option<&str>) -> Option<&'a str> {
    (!o.abstained && reject != Some(o.top.as_str())).then_some(o.top.as_str())
}

/// Scores `outcomes`, taking `wall_secs` as the run's wall-clock time and
/// `reject_label` as the out-of-scope class, if the task has one.
pub fn report(outcomes: &[Outcome], wall_secs: f64, reject_label: Option<&str>) -> Report {
    let n = outcomes.len();
    let preds: Vec<Option<&str>> = outcomes
        .iter()
        .map(|o| predicted(o, reject_label))
        .collect();
    let is_oos = |o: &Outcome| reject_label == Some(o.truth.as_str());

    let (mut correct, mut in_scope, mut in_scope_correct) = (0, 0, 0);
    let (mut oos, mut oos_rejected, mut in_scope_none, mut none) = (0, 0, 0, 0);
    for (o, p) in outcomes.iter().zip(&preds) {
        none += usize::from(p.is_none());
        if is_oos(o) {
            oos += 1;
            oos_rejected += usize::from(p.is_none());
            correct += usize::from(p.is_none());
        } else {
            let ok = *p == Some(o.truth.as_str());
            in_scope += 1;
            in_scope_none += usize::from(p.is_none());
            in_scope_correct += usize::from(ok);
            correct += usize::from(ok);
        }
    }

    let per_label = label_scores(outcomes, &preds, reject_label);
    let scored: Vec<f64> = per_label
        .iter()
        .filter(|s| s.support > 0)
        .map(|s| s.f1)
        .collect();
    let macro_f1 = if scored.is_empty() {
        0.0
    } else {
        scored.iter().sum::<f64>() / scored.len() as f64
    };

    let (slot_precision, slot_recall, slot_f1) = slot_scores(outcomes);
    let mut latencies: Vec<f64> = outcomes.iter().map(|o| o.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);

    Report {
        n,
        accuracy: ratio(correct, n),
        in_scope_accuracy: opt_ratio(in_scope_correct, in_scope),
        macro_f1,
        abstain_rate: ratio(none, n),
        in_scope_abstain_rate: opt_ratio(in_scope_none, in_scope),
        oos_rejection: opt_ratio(oos_rejected, oos),
        ece: ece(outcomes),
        slot_precision,
        slot_recall,
        slot_f1,
        p50_ms: percentile(&latencies, 50.0),
        p95_ms: percentile(&latencies, 95.0),
        mean_ms: if n == 0 {
            0.0
        } else {
            latencies.iter().sum::<f64>() / n as f64
        },
        throughput_per_s: if wall_secs > 0.0 {
            n as f64 / wall_secs
        } else {
            0.0
        },
        per_label,
        confusion: confusion(outcomes),
        per_seed: Vec::new(),
        per_stage: Vec::new(),
        realistic: None,
    }
}

/// Each seed's scores in a repeated cross-validation: the outcomes of
/// [`super::cross_validation`]'s trials, an equal share per seed, in seed
/// order.
pub fn per_seed(outcomes: &[Outcome], seeds: &[u64], reject_label: Option<&str>) -> Vec<SeedScore> {
    let rows = outcomes.len() / seeds.len().max(1);
    seeds
        .iter()
        .zip(outcomes.chunks(rows.max(1)))
        .map(|(&seed, chunk)| SeedScore::new(seed, &report(chunk, 0.0, reject_label)))
        .collect()
}

/// Per-label precision/recall/F1 over all truths and predicted labels,
/// excluding the reject label, sorted by label.
fn label_scores(
    outcomes: &[Outcome],
    preds: &[Option<&str>],
    reject: Option<&str>,
) -> Vec<LabelScore> {
    // label -> (predicted as it, truly it, both)
    let mut counts: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for (o, p) in outcomes.iter().zip(preds) {
        if reject != Some(o.truth.as_str()) {
            counts.entry(&o.truth).or_default().1 += 1;
        }
        if let Some(p) = *p {
            let c = counts.entry(p).or_default();
            c.0 += 1;
            c.2 += usize::from(p == o.truth);
        }
    }
    counts
        .into_iter()
        .map(|(label, (predicted, support, hits))| {
            let precision = ratio(hits, predicted);
            let recall = ratio(hits, support);
            LabelScore {
                label: label.to_string(),
                precision,
                recall,
                f1: harmonic(precision, recall),
                support,
            }
        })
        .collect()
}

fn confusion(outcomes: &[Outcome]) -> Confusion {
    let rows: Vec<String> = outcomes
        .iter()
        .map(|o| o.truth.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let columns: BTreeSet<&str> = outcomes
        .iter()
        .flat_map(|o| {
            let top = (!o.abstained).then_some(o.top.as_str());
            std::iter::once(o.truth.as_str()).chain(top)
        })
        .collect();
    let column_of: BTreeMap<&str, usize> =
        columns.iter().enumerate().map(|(j, &l)| (l, j)).collect();
    let abstain = columns.len();
    let mut matrix = vec![vec![0; abstain + 1]; rows.len()];
    for o in outcomes {
        let i = rows.binary_search(&o.truth).expect("truth is a row");
        let j = if o.abstained {
            abstain
        } else {
            column_of[o.top.as_str()]
        };
        matrix[i][j] += 1;
    }
    let mut labels: Vec<String> = columns.into_iter().map(str::to_string).collect();
    labels.push(ABSTAIN_COLUMN.to_string());
    Confusion {
        labels,
        rows,
        matrix,
    }
}

/// Expected calibration error of the top-1 confidence over 10 equal bins.
fn ece(outcomes: &[Outcome]) -> f64 {
    const BINS: usize = 10;
    // per bin: (count, sum of confidence, count with top == truth)
    let mut bins = [(0usize, 0.0f64, 0usize); BINS];
    for o in outcomes {
        let c = f64::from(o.confidence).clamp(0.0, 1.0);
        let b = ((c * BINS as f64) as usize).min(BINS - 1);
        bins[b].0 += 1;
        bins[b].1 += c;
        bins[b].2 += usize::from(o.top == o.truth);
    }
    let n = outcomes.len() as f64;
    bins.iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, conf, hits)| {
            let count_f = count as f64;
            (count_f / n) * (conf / count_f - hits as f64 / count_f).abs()
        })
        .sum()
}

/// Micro-averaged slot precision, recall and F1; all `None` when no row has
/// truth or predicted slots.
fn slot_scores(outcomes: &[Outcome]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let (mut tp, mut predicted, mut truth) = (0, 0, 0);
    for o in outcomes {
        predicted += o.predicted_slots.len();
        truth += o.truth_slots.len();
        tp += o
            .predicted_slots
            .iter()
            .filter(|(name, value)| {
                o.truth_slots
                    .get(*name)
                    .is_some_and(|t| slot_values_match(t, value))
            })
            .count();
    }
    if predicted == 0 && truth == 0 {
        return (None, None, None);
    }
    let (p, r) = (ratio(tp, predicted), ratio(tp, truth));
    (Some(p), Some(r), Some(harmonic(p, r)))
}

/// Nearest-rank percentile of sorted values: `sorted[ceil(p/100 · n) − 1]`,
/// index clamped; 0 for no values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64 / 100.0).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

/// Widest label printed in the text tables; longer ones are truncated.
const MAX_LABEL_WIDTH: usize = 28;
/// Terminal width the text report is laid out for.
const TEXT_WIDTH: usize = 100;
/// Off-diagonal cells listed when the confusion matrix is too wide to print.
const TOP_CONFUSIONS: usize = 20;

fn shorten(label: &str, width: usize) -> String {
    if label.chars().count() <= width {
        label.to_string()
    } else {
        let mut s: String = label.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

impl Report {
    /// Human-readable report: headline figures, a per-label table and the
    /// confusion matrix (or, when it would not fit in 100 columns, its largest
    /// off-diagonal cells).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, value: String| {
            let _ = writeln!(out, "{name:<20}{value}");
        };
        line("rows", self.n.to_string());
        line("accuracy", format!("{:.3}", self.accuracy));
        if let Some(a) = self.in_scope_accuracy {
            if self.oos_rejection.is_some() {
                line("in-scope accuracy", format!("{a:.3}"));
            }
        }
        if let Some(r) = self.oos_rejection {
            line("oos rejection", format!("{r:.3}"));
        }
        line("macro-F1", format!("{:.3}", self.macro_f1));
        line("abstain rate", format!("{:.3}", self.abstain_rate));
        if let (Some(r), Some(_)) = (self.in_scope_abstain_rate, self.oos_rejection) {
            line("in-scope abstain", format!("{r:.3}"));
        }
        line("ECE", format!("{:.3}", self.ece));
        if let (Some(p), Some(r), Some(f)) = (self.slot_precision, self.slot_recall, self.slot_f1) {
            line("slot P / R / F1", format!("{p:.3} / {r:.3} / {f:.3}"));
        }
        line(
            "latency ms",
            format!(
                "p50 {:.1}  p95 {:.1}  mean {:.1}",
                self.p50_ms, self.p95_ms, self.mean_ms
            ),
        );
        line("throughput", format!("{:.1} msgs/s", self.throughput_per_s));
        if !self.per_seed.is_empty() {
            let seeds: Vec<String> = self
                .per_seed
                .iter()
                .map(|s| format!("{}: {:.3}", s.seed, s.accuracy))
                .collect();
            line("accuracy by seed", seeds.join("  "));
        }
        if let Some(r) = &self.realistic {
            let oos = r.oos_rejection.map_or(String::new(), |o| {
                format!("  oos rejection {o:.3} (none trained)")
            });
            let in_scope = match (r.in_scope_accuracy, r.oos_rejection) {
                (Some(a), Some(_)) => format!("  in-scope accuracy {a:.3}"),
                _ => String::new(),
            };
            line(
                "realistic",
                format!(
                    "accuracy {:.3}{in_scope}{oos}  ({} paraphrase clusters held out whole)",
                    r.accuracy, r.clusters
                ),
            );
        }
        for s in &self.per_stage {
            let slots = s
                .slot_f1
                .map_or(String::new(), |f| format!("  slot F1 {f:.3}"));
            line(
                &format!("by {}", s.stage.name()),
                format!(
                    "{} rows ({:.3})  accuracy {:.3}{slots}  p50 {:.2} ms",
                    s.rows, s.share, s.accuracy, s.p50_ms
                ),
            );
        }

        if !self.per_label.is_empty() {
            self.write_label_table(&mut out);
        }
        if !self.confusion.rows.is_empty() {
            self.write_confusion(&mut out);
        }
        out
    }

    fn write_label_table(&self, out: &mut String) {
        let w = self
            .per_label
            .iter()
            .map(|s| s.label.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(5, MAX_LABEL_WIDTH);
        let _ = writeln!(
            out,
            "\n{:<w$}  {:>9}  {:>6}  {:>6}  {:>7}",
            "label", "precision", "recall", "f1", "support"
        );
        for s in &self.per_label {
            let _ = writeln!(
                out,
                "{:<w$}  {:>9.3}  {:>6.3}  {:>6.3}  {:>7}",
                shorten(&s.label, w),
                s.precision,
                s.recall,
                s.f1,
                s.support
            );
        }
    }

    fn write_confusion(&self, out: &mut String) {
        let c = &self.confusion;
        let w = c
            .rows
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(5, MAX_LABEL_WIDTH);
        let max_count = c.matrix.iter().flatten().copied().max().unwrap_or(0);
        let cell = max_count
            .to_string()
            .len()
            .max((c.labels.len() - 1).to_string().len())
            + 1;

        if w + c.labels.len() * cell > TEXT_WIDTH {
            self.write_top_confusions(out, w);
            return;
        }
        let _ = writeln!(out, "\nconfusion (rows: truth, columns: see legend)");
        let mut legend = String::new();
        for (j, label) in c.labels.iter().enumerate() {
            let item = format!("{j}={label}");
            if !legend.is_empty() && legend.len() + item.len() + 2 > TEXT_WIDTH {
                let _ = writeln!(out, "{legend}");
                legend.clear();
            }
            if legend.is_empty() {
                legend.push_str("  ");
            } else {
                legend.push(' ');
            }
            legend.push_str(&item);
        }
        let _ = writeln!(out, "{legend}");
        let _ = write!(out, "{:<w$}", "");
        for j in 0..c.labels.len() {
            let _ = write!(out, "{j:>cell$}");
        }
        out.push('\n');
        for (row, counts) in c.rows.iter().zip(&c.matrix) {
            let _ = write!(out, "{:<w$}", shorten(row, w));
            for count in counts {
                let _ = write!(out, "{count:>cell$}");
            }
            out.push('\n');
        }
    }

    /// Fallback for wide matrices: the largest truth → column cells off the
    /// diagonal.
    fn write_top_confusions(&self, out: &mut String, w: usize) {
        let c = &self.confusion;
        let mut cells: Vec<(usize, &str, &str)> = Vec::new();
        for (row, counts) in c.rows.iter().zip(&c.matrix) {
            for (col, &count) in c.labels.iter().zip(counts) {
                if count > 0 && col != row {
                    cells.push((count, row, col));
                }
            }
        }
        cells.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(b.2)));
        let _ = writeln!(
            out,
            "\ntop confusions ({} labels; full matrix in the JSON report)",
            c.labels.len() - 1
        );
        if cells.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (count, row, col) in cells.into_iter().take(TOP_CONFUSIONS) {
            let _ = writeln!(
                out,
                "  {:<w$} -> {:<w$} {count:>6}",
                shorten(row, w),
                shorten(col, w)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slmd_core::examples::slot_values_match;

    fn row(truth: &str, top: &str, abstained: bool) -> Outcome {
        Outcome {
            text: String::new(),
            truth: truth.into(),
            top: top.into(),
            confidence: 0.5,
            abstained,
            truth_slots: BTreeMap::new(),
            predicted_slots: BTreeMap::new(),
            latency_ms: 1.0,
            by: slmd_engine::Stage::Model,
        }
    }

    #[test]
    fn each_seed_is_scored_on_its_own_rows_and_the_pool_is_their_mean() {
        // Seed 1 gets all four rows right, seed 2 half of them.
        let outcomes: Vec<Outcome> = ["a", "b", "a", "b", "a", "a", "b", "b"]
            .iter()
            .zip(["a", "b", "a", "b", "a", "b", "a", "b"])
            .map(|(top, truth)| row(truth, top, false))
            .collect();
        let seeds = per_seed(&outcomes, &[1, 2], None);
        assert_eq!(seeds.iter().map(|s| s.seed).collect::<Vec<_>>(), [1, 2]);
        assert!(close(seeds[0].accuracy, 1.0));
        assert!(close(seeds[1].accuracy, 0.5));
        assert!(close(report(&outcomes, 1.0, None).accuracy, 0.75));
        assert_eq!(seeds[0].oos_rejection, None);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    fn score<'a>(r: &'a Report, label: &str) -> &'a LabelScore {
        r.per_label.iter().find(|s| s.label == label).unwrap()
    }

    /// a,a → ok; a,a → ok; a→b; b,b → ok; b→a; c abstained.
    fn hand_set() -> Vec<Outcome> {
        vec![
            row("a", "a", false),
            row("a", "a", false),
            row("a", "b", false),
            row("b", "b", false),
            row("b", "a", false),
            row("c", "c", true),
        ]
    }

    #[test]
    fn hand_made_set() {
        let r = report(&hand_set(), 1.0, None);
        assert_eq!(r.n, 6);
        assert!(close(r.accuracy, 0.5));
        assert_eq!(r.in_scope_accuracy, Some(0.5));
        assert_eq!(r.oos_rejection, None);
        assert!(close(r.abstain_rate, 1.0 / 6.0));
        assert!(close(r.in_scope_abstain_rate.unwrap(), 1.0 / 6.0));

        let a = score(&r, "a");
        assert!(close(a.precision, 2.0 / 3.0) && close(a.recall, 2.0 / 3.0));
        assert!(close(a.f1, 2.0 / 3.0));
        assert_eq!(a.support, 3);
        let b = score(&r, "b");
        assert!(close(b.precision, 0.5) && close(b.recall, 0.5) && close(b.f1, 0.5));
        let c = score(&r, "c");
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 1));
        // (2/3 + 1/2 + 0) / 3
        assert!(close(r.macro_f1, 7.0 / 18.0));
        let names: Vec<_> = r.per_label.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);

        assert_eq!(r.confusion.rows, ["a", "b", "c"]);
        assert_eq!(r.confusion.labels, ["a", "b", "c", ABSTAIN_COLUMN]);
        assert_eq!(
            r.confusion.matrix,
            vec![vec![2, 1, 0, 0], vec![1, 1, 0, 0], vec![0, 0, 0, 1]]
        );
    }

    #[test]
    fn reject_label_semantics() {
        let rows = vec![
            row("oos", "x", true),    // oos, abstained: correct
            row("oos", "oos", false), // oos, answered reject class: correct
            row("oos", "x", false),   // oos, predicted in scope: wrong
            row("x", "x", true),      // in scope, abstained: wrong
            row("x", "x", false),     // in scope, right: correct
        ];
        let r = report(&rows, 1.0, Some("oos"));
        assert!(close(r.accuracy, 3.0 / 5.0));
        assert_eq!(r.in_scope_accuracy, Some(0.5));
        assert!(close(r.oos_rejection.unwrap(), 2.0 / 3.0));
        assert_eq!(r.in_scope_abstain_rate, Some(0.5));
        assert!(close(r.abstain_rate, 3.0 / 5.0));

        // The reject label is never scored as a label.
        assert_eq!(r.per_label.len(), 1);
        let x = score(&r, "x");
        assert_eq!((x.precision, x.recall, x.support), (0.5, 0.5, 2));
        assert!(close(r.macro_f1, 0.5));

        assert_eq!(r.confusion.rows, ["oos", "x"]);
        assert_eq!(r.confusion.labels, ["oos", "x", ABSTAIN_COLUMN]);
        assert_eq!(r.confusion.matrix, vec![vec![1, 1, 1], vec![0, 1, 1]]);
    }

    #[test]
    fn no_oos_rows_gives_no_oos_rejection() {
        let r = report(&hand_set(), 1.0, Some("oos"));
        assert_eq!(r.oos_rejection, None);
        assert!(close(r.accuracy, 0.5));
    }

    fn with_confidence(conf: f32, right: bool) -> Outcome {
        let mut o = row("a", if right { "a" } else { "b" }, false);
        o.confidence = conf;
        o
    }

    #[test]
    fn ece_constructed_cases() {
        let calibrated: Vec<_> = (0..10).map(|i| with_confidence(0.9, i < 9)).collect();
        assert!(report(&calibrated, 1.0, None).ece < 1e-6);

        let over: Vec<_> = (0..10).map(|i| with_confidence(0.9, i < 5)).collect();
        assert!(close(report(&over, 1.0, None).ece, 0.4));

        // Half at 0.2 all wrong (error 0.2), half at 1.0 all right (last bin,
        // error 0): 0.5 * 0.2 = 0.1. Abstention does not matter.
        let mut mixed: Vec<_> = (0..10)
            .map(|i| with_confidence(if i < 5 { 0.2 } else { 1.0 }, i >= 5))
            .collect();
        mixed[9].abstained = true;
        assert!(close(report(&mixed, 1.0, None).ece, 0.1));
    }

    fn slots(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn slot_matching_normalises() {
        assert!(slot_values_match("Kitchen ", "kitchen"));
        assert!(slot_values_match("21", "21.0"));
        assert!(slot_values_match(" Living   Room", "living room"));
        assert!(!slot_values_match("21", "22"));
        assert!(!slot_values_match("kitchen", "hall"));

        let mut o = row("set_temp", "set_temp", false);
        o.truth_slots = slots(&[("room", "kitchen"), ("temp", "21")]);
        o.predicted_slots = slots(&[("room", "Kitchen "), ("temp", "21.0"), ("mode", "eco")]);
        let mut o2 = row("lights", "lights", false);
        o2.truth_slots = slots(&[("room", "hall")]);
        o2.predicted_slots = slots(&[("room", "kitchen")]);
        let r = report(&[o, o2], 1.0, None);
        // TP 2 of 4 predicted, of 3 truth.
        assert!(close(r.slot_precision.unwrap(), 0.5));
        assert!(close(r.slot_recall.unwrap(), 2.0 / 3.0));
        assert!(close(r.slot_f1.unwrap(), 4.0 / 7.0));
    }

    #[test]
    fn classify_only_run_has_no_slot_scores() {
        let r = report(&hand_set(), 1.0, None);
        assert_eq!(
            (r.slot_precision, r.slot_recall, r.slot_f1),
            (None, None, None)
        );
    }

    #[test]
    fn latency_percentiles_and_throughput() {
        let rows: Vec<_> = (1..=100)
            .rev()
            .map(|i| {
                let mut o = row("a", "a", false);
                o.latency_ms = f64::from(i);
                o
            })
            .collect();
        let r = report(&rows, 4.0, None);
        assert_eq!((r.p50_ms, r.p95_ms), (50.0, 95.0));
        assert!(close(r.mean_ms, 50.5));
        assert!(close(r.throughput_per_s, 25.0));
        assert_eq!(report(&rows, 0.0, None).throughput_per_s, 0.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
    }

    #[test]
    fn empty_input() {
        let r = report(&[], 0.0, Some("oos"));
        assert_eq!(r.n, 0);
        assert_eq!(
            (r.accuracy, r.macro_f1, r.abstain_rate, r.ece),
            (0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(
            (r.in_scope_accuracy, r.oos_rejection, r.slot_f1),
            (None, None, None)
        );
        assert_eq!((r.p50_ms, r.p95_ms, r.mean_ms), (0.0, 0.0, 0.0));
        assert!(r.per_label.is_empty() && r.confusion.rows.is_empty());
        assert_eq!(r.confusion.labels, [ABSTAIN_COLUMN]);
        assert!(r.to_text().contains("rows"));
    }

    #[test]
    fn serialises_expected_fields() {
        let v = serde_json::to_value(report(&hand_set(), 2.0, None)).unwrap();
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = [
            "n",
            "accuracy",
            "in_scope_accuracy",
            "macro_f1",
            "abstain_rate",
            "in_scope_abstain_rate",
            "oos_rejection",
            "ece",
            "slot_precision",
            "slot_recall",
            "slot_f1",
            "p50_ms",
            "p95_ms",
            "mean_ms",
            "throughput_per_s",
            "per_label",
            "confusion",
        ]
        .into_iter()
        .collect();
        assert_eq!(keys, expected);
        assert!(v["oos_rejection"].is_null());
        assert_eq!(v["per_label"][0]["support"], 3);
        assert_eq!(v["confusion"]["matrix"][2][3], 1);
    }

    #[test]
    fn text_contains_headline_numbers() {
        let mut rows = hand_set();
        rows.push(row("oos", "oos", false));
        let text = report(&rows, 2.0, Some("oos")).to_text();
        assert!(text.contains("rows                7"), "{text}");
        assert!(text.contains("accuracy            0.571"), "{text}"); // 4/7
        assert!(text.contains("in-scope accuracy   0.500"), "{text}");
        assert!(text.contains("oos rejection       1.000"), "{text}");
        assert!(text.contains("macro-F1            0.389"), "{text}");
        assert!(text.contains("throughput          3.5 msgs/s"), "{text}");
        assert!(text.contains("p50 1.0"), "{text}");
        assert!(text.contains("0=a 1=b 2=c 3=oos 4=(abstain)"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= TEXT_WIDTH));
    }

    #[test]
    fn wide_confusion_falls_back_to_top_cells() {
        let rows: Vec<_> = (0..60)
            .map(|i| {
                row(
                    &format!("label_{i:02}"),
                    &format!("label_{:02}", (i + 1) % 60),
                    false,
                )
            })
            .collect();
        let text = report(&rows, 1.0, None).to_text();
        assert!(text.contains("top confusions (60 labels"), "{text}");
        assert!(
            text.lines().all(|l| l.chars().count() <= TEXT_WIDTH),
            "{text}"
        );
    }
}
