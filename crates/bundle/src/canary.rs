//! The canary gate: a new model answers the configured golden examples
//! before it may serve, beside the running one.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use slmd_engine::Engine;

use super::BundleError;

/// One golden example: a task, a text and the label (for extract tasks,
/// the intent) it must get.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    pub task: String,
    pub text: String,
    pub label: String,
}

/// Reads a JSONL file of [`Golden`] rows.
pub fn load(path: &Path) -> Result<Vec<Golden>, BundleError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| super::io_err(format!("reading {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| BundleError::Canary(format!("{} line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// What the gate asks of a model.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub min_accuracy: f64,
    pub max_p95_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub p95_ms: f64,
    pub seconds: f64,
    pub passed: bool,
    /// Why it failed; empty when it passed.
    pub reason: String,
}

/// Runs every golden example through `engine`, one at a time (blocking).
/// Each task answers its first example once untimed first, so one-time
/// costs (first decode, page faults in a fresh mapping) do not count as
/// latency.
pub fn run(engine: &Engine, golden: &[Golden], gate: Gate) -> Report {
    let started = Instant::now();
    let mut warmed: Vec<&str> = Vec::new();
    for g in golden {
        if !warmed.contains(&g.task.as_str()) {
            warmed.push(&g.task);
            let _ = engine.infer_blocking(&g.task, g.text.clone());
        }
    }
    let mut latencies = Vec::with_capacity(golden.len());
    let mut correct = 0;
    let mut failures = Vec::new();
    for g in golden {
        let t0 = Instant::now();
        match engine.infer_blocking(&g.task, g.text.clone()) {
            Ok(s) if s.label.as_deref() == Some(g.label.as_str()) => correct += 1,
            Ok(_) => {}
            Err(e) => failures.push(format!("{:?}: {e}", g.text)),
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let p95_ms = latencies
        .get((latencies.len() * 95).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    let accuracy = if golden.is_empty() {
        1.0
    } else {
        correct as f64 / golden.len() as f64
    };
    let mut why = Vec::new();
    if let Some(f) = failures.first() {
        why.push(format!("{} example(s) failed, first {f}", failures.len()));
    }
    if accuracy < gate.min_accuracy {
        why.push(format!(
            "accuracy {accuracy:.3} < {:.3} ({correct} of {})",
            gate.min_accuracy,
            golden.len()
        ));
    }
    if p95_ms > gate.max_p95_ms {
        why.push(format!("p95 {p95_ms:.1} ms > {:.1} ms", gate.max_p95_ms));
    }
    Report {
        examples: golden.len(),
        correct,
        accuracy,
        p95_ms,
        seconds: started.elapsed().as_secs_f64(),
        passed: why.is_empty(),
        reason: why.join("; "),
    }
}
