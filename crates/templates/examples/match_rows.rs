//! Matches labelled rows with the template stage alone and prints what it
//! got right: `match_rows INTENTS.json FIXTURES.yaml ROWS.jsonl [--misses]`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;
use slmd_templates::{Home, Sources};

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_lowercase(),
        v => v.to_string(),
    }
}

/// This process's resident memory in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut sources = Sources::default();
    sources.add_path(args[0].as_ref()).unwrap();
    // What the compiled form costs, not the parsed files (dropped after).
    let home = Home::from_fixtures(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let (before, started) = (rss_kib(), Instant::now());
    let t = sources.compile(&home).unwrap();
    eprintln!(
        "{} sentences compiled in {:?}; resident memory {} KiB more than before",
        t.len(),
        started.elapsed(),
        rss_kib().saturating_sub(before)
    );
    if args.iter().any(|a| a == "--samples") {
        // Written sentences must match back to their own answer.
        let samples = t.sample(2, 1);
        let back = samples
            .iter()
            .filter(|s| {
                t.recognise(&s.text, &BTreeMap::new())
                    .is_some_and(|m| m.intent == s.intent)
            })
            .count();
        for s in samples.iter().step_by(samples.len() / 12 + 1) {
            println!("{} [{}] {:?}", s.text, s.intent, s.slots);
        }
        println!(
            "{} samples, {back} match back to their intent",
            samples.len()
        );
        return;
    }
    let misses = args.iter().any(|a| a == "--misses");
    let (mut n, mut matched, mut right, mut tp, mut fp, mut fnn) = (0, 0, 0, 0, 0, 0);
    let mut times = Vec::new();
    for line in std::fs::read_to_string(&args[2]).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let context: BTreeMap<String, String> = row["context"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default();
        let context = context
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    row["context"][&k].as_str().map_or(v, str::to_owned),
                )
            })
            .collect();
        let started = Instant::now();
        let m = t.recognise(row["text"].as_str().unwrap(), &context);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        n += 1;
        let want: Vec<(String, String)> = row["slots"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default();
        let Some(m) = m else {
            fnn += want.len();
            if misses {
                println!("NONE  {} [{}]", row["text"], row["intent"]);
            }
            continue;
        };
        matched += 1;
        if m.intent == row["intent"].as_str().unwrap() {
            right += 1;
        }
        let got: Vec<(String, String)> =
            m.slots.iter().map(|(k, v)| (k.clone(), text(v))).collect();
        let hits = got.iter().filter(|g| want.contains(g)).count();
        tp += hits;
        fp += got.len() - hits;
        fnn += want.len() - hits;
        if misses && (hits != want.len() || hits != got.len() || m.intent != row["intent"]) {
            println!(
                "DIFF  {} [{}] got {} {:?} want {:?}",
                row["text"], row["intent"], m.intent, got, want
            );
        }
    }
    times.sort_by(f64::total_cmp);
    let f1 = 2.0 * tp as f64 / (2 * tp + fp + fnn).max(1) as f64;
    println!(
        "rows {n} matched {matched} ({:.3}) intent accuracy {:.3} slot F1 {:.3} p50 {:.3} ms max {:.3} ms",
        matched as f64 / n as f64,
        right as f64 / n as f64,
        f1,
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
