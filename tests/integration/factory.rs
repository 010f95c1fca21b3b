//! The factory pack end to end: `slmd replay` publishes a recorded spindle
//! series to mosquitto, the daemon (configs/factory.toml's monitor task,
//! the real model) publishes anomaly notes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::Running;

const NOTES: &str = "slmd/factory/note";
const ERRORS: &str = "slmd/factory/error";
const READINGS: &str = "factory/line1/reading";
const CAUSES: &[&str] = &[
    "overheating",
    "mechanical_wear",
    "overload",
    "coolant_loss",
    "sensor_fault",
];

/// Runs `slmd replay` on `csv`; its stdout.
fn replay(csv: &Path, port: u16) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_slmd"))
        .arg("replay")
        .arg(csv)
        .args(["--topic", READINGS, "--rate", "200", "--unit", "C"])
        .args(["--broker", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Magnitudes of the numbers written in `text` (written here, not taken
/// from slmd, so the check does not trust the code it checks).
fn numbers(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (c == '.' && !cur.is_empty() && !cur.contains('.')) {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(cur.trim_end_matches('.').parse().unwrap());
            cur.clear();
        }
    }
    out
}

/// Every number of the note's sentence is one of its numeric fields (or
/// in the sensor or unit name).
fn assert_grounded(note: &serde_json::Value) {
    let sentence = note["sentence"].as_str().expect("sentence");
    let mut facts: Vec<f64> = note
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !["latency_ms", "cause_confidence", "model"].contains(&k.as_str()))
        .filter_map(|(_, v)| v.as_f64())
        .map(f64::abs)
        .collect();
    facts.extend(numbers(note["sensor"].as_str().unwrap()));
    facts.extend(numbers(note["unit"].as_str().unwrap_or("")));
    for n in numbers(sentence) {
        assert!(
            facts.contains(&n),
            "{n} in {sentence:?} is not a fact of {note}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excursion_gets_one_grounded_note_and_repeats_are_counted() {
    let Running {
        broker,
        mut daemon,
        mut sub,
        dir,
    } = Running::pack("factory", &[NOTES, ERRORS]).await;

    // 40 s of a steady spindle (65 C +- 0.3), then a 6-reading excursion,
    // then steady again; one reading a second.
    let t0 = 1_767_225_600u64;
    let mut csv = String::from("timestamp,value\n");
    let steady = |i: u64| 65.0 + 0.3 * ((i as f64) * 1.3).sin();
    for i in 0..40 {
        csv += &format!("{},{:.2}\n", t0 + i, steady(i));
    }
    let excursion = [70.0, 78.0, 86.0, 92.0, 92.5, 92.2];
    for (j, v) in excursion.iter().enumerate() {
        csv += &format!("{},{v}\n", t0 + 40 + j as u64);
    }
    for i in 46..60 {
        csv += &format!("{},{:.2}\n", t0 + i, steady(i));
    }
    let first = dir.path().join("spindle_temp.csv");
    std::fs::write(&first, &csv).unwrap();
    let said = replay(&first, broker.port);
    assert!(said.contains("60 readings"), "{said}");

    let note = sub.take(1, Duration::from_secs(120)).await.remove(0);
    assert_eq!(note.topic, NOTES, "{note:?}");
    let n = note.json();
    assert_eq!(n["task"], "factory");
    assert_eq!(n["sensor"], "spindle_temp");
    assert_eq!(n["unit"], "C");
    assert_eq!(n["value"], 70.0);
    assert_eq!(n["ts"], (t0 + 40) as f64);
    assert_eq!(n["count"], 1);
    // The first detector of the spindle's list that fires on 70 C.
    assert_eq!(n["detector"], "zscore");
    let baseline = n["baseline"].as_f64().unwrap();
    assert!((baseline - 65.0).abs() < 0.3, "{n}");
    let deviation = n["deviation"].as_f64().unwrap();
    assert!((deviation - (70.0 - baseline)).abs() < 0.01, "{n}");
    assert!(n["sigma"].as_f64().unwrap() > 5.0, "{n}");
    assert_eq!(n["duration_s"], 1.0);
    let cause = n["cause"].as_str().expect("a cause");
    assert!(CAUSES.contains(&cause), "{cause} is not a configured cause");
    assert_grounded(&n);
    assert!(n["sentence"]
        .as_str()
        .unwrap()
        .starts_with("spindle_temp rose to 70 C"));
    // The other five anomalous readings are within the cooldown: no note.
    let extra = sub.extra(Duration::from_secs(5)).await;
    assert!(extra.is_empty(), "more than one note: {extra:?}");

    // Malformed readings get error results; the daemon carries on.
    sub.publish(READINGS, "not json").await;
    sub.publish(READINGS, r#"{"sensor":"spindle_temp","value":"hot"}"#)
        .await;
    let errors = sub.take(2, Duration::from_secs(30)).await;
    let mut reasons: Vec<String> = errors
        .iter()
        .map(|m| {
            assert_eq!(m.topic, ERRORS);
            let e = m.json();
            assert_eq!(e["task"], "factory");
            e["error"]["reason"].as_str().unwrap().to_owned()
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_value", "invalid_json"]);
    assert!(daemon.is_running());

    // Ten minutes later (past the 300 s cooldown) another excursion: its
    // note carries itself and the six held back (five excursion readings,
    // and the drop back to 65 C, which the rate detector calls anomalous).
    let later = t0 + 600;
    let second = dir.path().join("second.csv");
    std::fs::write(&second, format!("ts,spindle_temp\n{later},93.1\n")).unwrap();
    replay(&second, broker.port);
    let n2 = sub.take(1, Duration::from_secs(120)).await.remove(0).json();
    assert_eq!(n2["sensor"], "spindle_temp");
    assert_eq!(n2["value"], 93.1);
    assert_eq!(n2["count"], 7, "{n2}");
    assert_eq!(n2["first_ts"], (t0 + 41) as f64);
    assert!(n2["sentence"]
        .as_str()
        .unwrap()
        .contains("7 anomalies since the last note"));
    assert!(CAUSES.contains(&n2["cause"].as_str().unwrap()));
    assert_grounded(&n2);
    assert!(sub.extra(Duration::from_secs(3)).await.is_empty());
}
