//! `slmd bench`: per-message latency and sustained throughput through the
//! engine, at several concurrencies, with and without prefix caching and
//! cross-sequence batching.
//!
//! Each configuration starts its own engine on the same model and task
//! (the trained head is shared through a head cache, so only the first
//! start trains). `c` client threads then send messages back to back until
//! `messages` have been answered; latency is per message, throughput is
//! answered messages over the wall time of the run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use slmd_core::examples::Row;
use slmd_engine::embed::DecodeOptions;
use slmd_engine::{Engine, EngineError, EngineOptions, TaskSpec};

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub prefix_cache: bool,
    pub batching: bool,
    pub concurrency: usize,
    pub messages: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub throughput_per_s: f64,
}

/// Runs every configuration; `opts.decode` is replaced per configuration.
pub fn run(
    opts: &EngineOptions,
    task: &TaskSpec,
    rows: &[Row],
    concurrencies: &[usize],
    messages: usize,
) -> Result<Vec<BenchRow>, EngineError> {
    let mut out = Vec::new();
    for (prefix_cache, batching) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut o = opts.clone();
        o.decode = DecodeOptions {
            prefix_cache,
            max_batch: if batching {
                slmd_engine::embed::MAX_SEQUENCES
            } else {
                1
            },
        };
        let engine = Engine::start(o, vec![task.clone()])?;
        // One warm-up pass so page faults and thread start-up are not timed.
        for r in rows.iter().take(4) {
            engine.infer_blocking(&task.name, r.text.clone())?;
        }
        for &c in concurrencies {
            let (latencies, wall) = drive(&engine, &task.name, rows, c, messages)?;
            out.push(BenchRow {
                prefix_cache,
                batching,
                concurrency: c,
                messages: latencies.len(),
                p50_ms: percentile(&latencies, 50.0),
                p95_ms: percentile(&latencies, 95.0),
                throughput_per_s: latencies.len() as f64 / wall,
            });
            log::info!("{:?}", out.last());
        }
    }
    Ok(out)
}

/// `c` threads send messages back to back until `messages` are answered.
fn drive(
    engine: &Engine,
    task: &str,
    rows: &[Row],
    c: usize,
    messages: usize,
) -> Result<(Vec<f64>, f64), EngineError> {
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(messages));
    let error = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..c {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    break;
                }
                let text = rows[i % rows.len()].text.clone();
                let t0 = Instant::now();
                match engine.infer_blocking(task, text) {
                    Ok(_) => latencies
                        .lock()
                        .unwrap()
                        .push(t0.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        *error.lock().unwrap() = Some(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap() {
        return Err(e);
    }
    Ok((
        latencies.into_inner().unwrap(),
        started.elapsed().as_secs_f64(),
    ))
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A Markdown table of the rows.
pub fn to_markdown(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| prefix cache | batching | concurrency | messages | p50 ms | p95 ms | msgs/s |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            if r.prefix_cache { "on" } else { "off" },
            if r.batching { "on" } else { "off" },
            r.concurrency,
            r.messages,
            r.p50_ms,
            r.p95_ms,
            r.throughput_per_s
        ));
    }
    s
}
