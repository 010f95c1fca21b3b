//! Model updates end to end: real bundles of the real model, the real
//! daemon and mosquitto. Refusals, the canary gate, SIGKILL at every step,
//! an update under load (the swap pause is measured), crash-loop rollback.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{model_path, serve_file, write_config, Broker, Client, Daemon};

pub(crate) struct Keys {
    pub public: String,
    pub secret: PathBuf,
}

pub(crate) fn keys(dir: &Path, name: &str) -> Keys {
    let out = slmd_cmd(&["model", "keygen"], &[dir.join(name).to_str().unwrap()]);
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("trusted_keys = [\""))
        .and_then(|l| l.strip_suffix("\"]"))
        .unwrap_or_else(|| panic!("no key in {out}"))
        .to_owned();
    Keys {
        public,
        secret: dir.join(format!("{name}.key")),
    }
}

/// Runs slmd, asserting success; returns stdout.
pub(crate) fn slmd_cmd(args: &[&str], more: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_slmd"))
        .args(args)
        .args(more)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "slmd {args:?} {more:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs slmd expecting failure; returns stderr.
fn slmd_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_slmd"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "slmd {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A bundle of the test model at `version`, signed with `keys` (or not).
pub(crate) fn bundle(dir: &Path, version: &str, keys: Option<&Keys>) -> PathBuf {
    let out = dir.join(format!("smol-{version}.slmdb"));
    let model = model_path();
    let mut args = vec![
        "model",
        "sign",
        "--model",
        model.to_str().unwrap(),
        "--name",
        "smol",
        "--version",
        version,
        "--licence",
        "Apache-2.0",
        "-o",
        out.to_str().unwrap(),
    ];
    if let Some(k) = keys {
        args.extend(["--secret-key", k.secret.to_str().unwrap()]);
    }
    slmd_cmd(&args, &[]);
    out
}

/// Rewrites one member of a bundle file (`f` gets its bytes).
fn tamper(file: &Path, out: &Path, member: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut archive = tar::Archive::new(std::fs::File::open(file).unwrap());
    let mut builder = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut f = Some(f);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_str().unwrap().to_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        if name == member {
            (f.take().unwrap())(&mut bytes);
        }
        if name == member && bytes.is_empty() {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder
            .append_data(&mut h, &name, bytes.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
    out.to_path_buf()
}

pub(crate) fn updates(keys: &Keys, extra: &str) -> String {
    // The latency gate is not under test; CI runs two tests at once on two
    // cores, so a canary there is slow. These tests send unsigned requests
    // naming bundles in the temporary directory unless `extra` says
    // otherwise (the defaults are tested in security.rs).
    let mut open = String::new();
    if !extra.contains("require_signed_requests") {
        open.push_str("require_signed_requests = false\n");
    }
    if !extra.contains("source_dir") {
        open.push_str(&format!(
            "source_dir = \"{}\"\n",
            std::env::temp_dir().display()
        ));
    }
    format!(
        "\n[updates]\ntrusted_keys = [\"{}\"]\ntrial_secs = 2\nmax_trial_starts = 2\n\
         canary_max_p95_ms = 60000\n{open}{extra}\n",
        keys.public
    )
}

/// A broker, a directory, a signing key and a config trusting it.
fn rig(extra: &str) -> (Broker, tempfile::TempDir, Keys, PathBuf) {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let config = write_config(dir.path(), broker.port, &updates(&k, extra));
    (broker, dir, k, config)
}

pub(crate) fn client_id(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("client_id = "))
        .unwrap();
    line.trim_start_matches("client_id = ")
        .trim_matches('"')
        .to_owned()
}

/// Sends one message and returns its result's `model` object.
pub(crate) async fn serving_model(sub: &mut Client, id: &str) -> Value {
    let msg = format!(r#"{{"id": "{id}", "text": "turn off the lights"}}"#);
    sub.publish("test/home/x", msg).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = sub
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|| panic!("no result for {id}"));
        if m.topic == "test/out/home" && m.json()["id"] == id {
            return m.json()["model"].clone();
        }
    }
}

/// The next model status (retained, on `slmd/<id>/model/status`) for which
/// `until` holds.
pub(crate) async fn status_until(
    sub: &mut Client,
    topic: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    loop {
        let m = sub
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|| panic!("not the awaited model status; saw {seen:?}"));
        if m.topic == topic {
            if until(&m.json()) {
                return m.json();
            }
            seen.push(m.json());
        }
    }
}

pub(crate) fn last_reason(s: &Value) -> String {
    s["last"]["reason"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_with_their_reason_while_the_model_keeps_serving() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let other = keys(dir.path(), "other");
    let config = write_config(dir.path(), broker.port, &updates(&k, ""));
    let cfg = config.to_str().unwrap();
    let id = client_id(&config);
    let status_topic = format!("slmd/{id}/model/status");
    let mut sub = Client::connect(broker.port, &["test/out/#", &status_topic]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    assert_eq!(
        serving_model(&mut sub, "before").await["version"],
        Value::Null
    );

    let good = bundle(dir.path(), "2.0.0", Some(&k));
    let d = dir.path();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            tamper(&good, &d.join("sha.slmdb"), "model.gguf", |b| {
                let n = b.len() - 1;
                b[n] ^= 0x55;
            }),
            "model sha256 is",
        ),
        (
            bundle(d, "2.0.1", Some(&other)),
            "no trusted key verifies it",
        ),
        (bundle(d, "2.0.2", None), "unsigned"),
        (
            tamper(&good, &d.join("short.slmdb"), "model.gguf", |b| {
                b.truncate(b.len() / 2)
            }),
            "truncated",
        ),
        (
            tamper(&good, &d.join("magic.slmdb"), "model.gguf", |b| {
                b[..4].copy_from_slice(b"GGML")
            }),
            "sha256",
        ),
    ];
    for (file, says) in &cases {
        let err = slmd_fails(&[
            "model",
            "install",
            file.to_str().unwrap(),
            "--activate",
            "--config",
            cfg,
        ]);
        assert!(err.contains(says), "{}: {err}", file.display());
    }
    // A signed bundle whose model is not GGUF at all.
    let text = d.join("notes.gguf");
    std::fs::write(&text, vec![b'x'; 100_000]).unwrap();
    let not_gguf = d.join("not-gguf.slmdb");
    slmd_cmd(
        &[
            "model",
            "sign",
            "--model",
            text.to_str().unwrap(),
            "--name",
            "x",
            "--version",
            "3",
        ],
        &[
            "--secret-key",
            k.secret.to_str().unwrap(),
            "-o",
            not_gguf.to_str().unwrap(),
        ],
    );
    let err = slmd_fails(&[
        "model",
        "install",
        not_gguf.to_str().unwrap(),
        "--config",
        cfg,
    ]);
    assert!(err.contains("not a usable GGUF"), "{err}");
    // A full disk: more must stay free than the file system has.
    let greedy = dir.path().join("greedy.toml");
    std::fs::write(
        &greedy,
        std::fs::read_to_string(&config).unwrap().replace(
            "trial_secs = 2",
            "trial_secs = 2\nreserve_bytes = 1000000000000000000",
        ),
    )
    .unwrap();
    let err = slmd_fails(&[
        "model",
        "install",
        good.to_str().unwrap(),
        "--config",
        greedy.to_str().unwrap(),
    ]);
    assert!(err.contains("bytes are needed"), "{err}");
    assert_eq!(
        serving_model(&mut sub, "after-cli").await["version"],
        Value::Null
    );

    // Over MQTT: a refusal is reported on the status topic; a good bundle
    // is installed, passes its canary and serves.
    let control = format!("slmd/{id}/model/update");
    let bad = cases[1].0.to_str().unwrap();
    sub.publish(&control, format!(r#"{{"source": "{bad}"}}"#))
        .await;
    let s = status_until(&mut sub, &status_topic, |s| {
        s["state"] == "idle" && s["last"]["outcome"] == "refused"
    })
    .await;
    assert!(last_reason(&s).starts_with("bad_signature"), "{s}");
    sub.publish(&control, format!(r#"{{"source": "{}"}}"#, good.display()))
        .await;
    let s = status_until(&mut sub, &status_topic, |s| {
        s["serving"]["version"] == "2.0.0"
    })
    .await;
    assert_eq!(s["last"]["outcome"], "activated", "{s}");
    assert_eq!(
        serving_model(&mut sub, "after-update").await["version"],
        "2.0.0"
    );
    // Older than the active one: refused unless forced.
    let old = bundle(d, "1.0.0", Some(&k));
    let err = slmd_fails(&["model", "install", old.to_str().unwrap(), "--config", cfg]);
    assert!(err.contains("older than the active 2.0.0"), "{err}");
    assert_eq!(
        serving_model(&mut sub, "after-downgrade").await["version"],
        "2.0.0"
    );
    assert!(daemon.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_fails_its_canary_is_not_activated_and_is_reported() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    // Golden examples the model answers otherwise (their labels are
    // swapped), so no model can pass.
    let golden = dir.path().join("golden.jsonl");
    std::fs::write(
        &golden,
        "{\"task\": \"home\", \"text\": \"turn off the lights\", \"label\": \"make_coffee\"}\n\
         {\"task\": \"home\", \"text\": \"brew me a coffee\", \"label\": \"lights_off\"}\n",
    )
    .unwrap();
    let extra = format!(
        "canary_examples = \"{}\"\ncanary_min_accuracy = 0.5",
        golden.display()
    );
    let config = write_config(dir.path(), broker.port, &updates(&k, &extra));
    let id = client_id(&config);
    let status_topic = format!("slmd/{id}/model/status");
    let mut sub = Client::connect(broker.port, &["test/out/#", &status_topic]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;

    let b = bundle(dir.path(), "2.0.0", Some(&k));
    sub.publish(
        &format!("slmd/{id}/model/update"),
        format!(r#"{{"source": "{}"}}"#, b.display()),
    )
    .await;
    let s = status_until(&mut sub, &status_topic, |s| {
        s["state"] == "idle" && s["last"]["outcome"] == "refused"
    })
    .await;
    assert!(
        last_reason(&s).contains("canary: accuracy 0.000 < 0.500"),
        "{s}"
    );
    assert_eq!(s["active_bundle"], Value::Null);
    assert_eq!(
        serving_model(&mut sub, "after").await["version"],
        Value::Null
    );
    // Installed (it verified), but not active.
    let listed = slmd_cmd(
        &["model", "bundles", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(
        listed.contains("2.0.0\tsmol") && listed.contains("\tinstalled"),
        "{listed}"
    );
    assert!(daemon.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_update_step_leaves_the_old_or_the_new_bundle_serving() {
    let (broker, dir, k, config) = rig("");
    let cfg = config.to_str().unwrap();
    let b = bundle(dir.path(), "2.0.0", Some(&k));
    let url = serve_file(&b, false);
    let mut sub = Client::connect(broker.port, &["test/out/#"]).await;
    // Step, and whether the new bundle serves after a kill there.
    let steps = [
        ("downloaded", false),
        ("unpacked", false),
        ("verified", false),
        ("installed", false),
        ("canary", false),
        ("pointer-written", false),
        ("activated", true),
    ];
    let state = dir.path().join("state");
    for (i, (step, new)) in steps.iter().enumerate() {
        let out = Command::new(env!("CARGO_BIN_EXE_slmd"))
            .args(["model", "install", &url, "--activate", "--config", cfg])
            .env("SLMD_FAULT_KILL_AT", step)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{step}: {out:?}");
        let log = dir.path().join(format!("after-{step}.log"));
        let mut daemon = Daemon::start_logged(&config, &broker.url(), &log);
        daemon.wait_subscribed().await;
        let model = serving_model(&mut sub, &format!("m-{i}")).await;
        let expected = if *new {
            Value::from("2.0.0")
        } else {
            Value::Null
        };
        assert_eq!(model["version"], expected, "after a kill at {step}");
        // Nothing half-done is left where it could be used: staging holds
        // at most a resumable download, and the pointer parses.
        let staged: Vec<String> = std::fs::read_dir(state.join("bundles/.staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".part"))
            .collect();
        assert!(staged.is_empty(), "after {step}: {staged:?}");
        slmd_cmd(&["model", "bundles", "--config", cfg], &[]);
        daemon.terminate();
        if *new {
            break;
        }
        // Start the next round from the [model] model again.
        let _ = std::fs::remove_dir_all(state.join("bundles"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_breaks_off_resumes_and_installs() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let config = write_config(dir.path(), 1, &updates(&k, ""));
    let b = bundle(dir.path(), "2.0.0", Some(&k));
    let url = serve_file(&b, true);
    let out = slmd_cmd(
        &[
            "model",
            "install",
            &url,
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.contains("\"version\": \"2.0.0\""), "{out}");
    let listed = slmd_cmd(
        &["model", "bundles", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(listed.contains("2.0.0\tsmol"), "{listed}");
}

/// RSS of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_under_load_loses_and_doubles_nothing_and_the_trial_ends() {
    let (broker, dir, k, config) = rig("");
    let id = client_id(&config);
    let status_topic = format!("slmd/{id}/model/status");
    let mut sub = Client::connect(broker.port, &["test/out/#", &status_topic]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    let pid = daemon.pid();
    let b = bundle(dir.path(), "2.0.0", Some(&k));
    serving_model(&mut sub, "warm").await;
    let rss_before = rss_mib(pid);

    // 20 messages a second until the switch, and 60 more after it.
    let producer = Client::connect(broker.port, &[]).await;
    let control = format!("slmd/{id}/model/update");
    let mut sent = 0usize;
    let mut results: Vec<(Instant, Value)> = Vec::new();
    let mut statuses: Vec<Value> = Vec::new();
    let mut switched_at: Option<usize> = None;
    let mut peak = rss_before;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let deadline = Instant::now() + Duration::from_secs(240);
    while !matches!(switched_at, Some(at) if sent >= at + 60) {
        assert!(Instant::now() < deadline, "no switch: {statuses:?}");
        tick.tick().await;
        let msg = format!(r#"{{"id": "load-{sent}", "text": "dim the lights a bit"}}"#);
        producer.publish("test/home/x", msg).await;
        sent += 1;
        if sent == 20 {
            producer
                .publish(&control, format!(r#"{{"source": "{}"}}"#, b.display()))
                .await;
        }
        peak = peak.max(rss_mib(pid));
        while let Some(m) = sub.next(Duration::from_millis(1)).await {
            if m.topic == status_topic {
                if m.json()["serving"]["version"] == "2.0.0" && switched_at.is_none() {
                    switched_at = Some(sent);
                }
                statuses.push(m.json());
            } else {
                results.push((Instant::now(), m.json()));
            }
        }
    }
    let unique = |results: &[(Instant, Value)]| {
        let mut ids: Vec<&str> = results
            .iter()
            .map(|(_, r)| r["id"].as_str().unwrap())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    while unique(&results) < sent {
        let m = sub
            .next(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{} of {sent} results", unique(&results)));
        if m.topic == status_topic {
            statuses.push(m.json());
        } else {
            results.push((Instant::now(), m.json()));
        }
    }
    // None lost; none processed twice. A QoS 1 redelivery (after a client
    // or broker reconnect) may repeat a result, but then it is the stored
    // result itself, identical to the first copy; a second processing would
    // differ (its latency at least).
    let mut first: std::collections::HashMap<&str, &Value> = Default::default();
    for (_, r) in &results {
        let id = r["id"].as_str().unwrap();
        let before = first.entry(id).or_insert(r);
        assert_eq!(*before, r, "{id} was processed twice");
    }
    let repeated = results.len() - sent;
    for m in sub.extra(Duration::from_secs(2)).await {
        if m.topic != status_topic {
            let r = m.json();
            let id = r["id"].as_str().unwrap().to_owned();
            eprintln!("LATE {id}: {r}\nFIRST {}", first[id.as_str()]);
            assert_eq!(first[id.as_str()], &r, "{id} was processed twice");
        }
    }
    // Messages taken after the switch run on the new model; those already
    // in flight (at most max_in_flight = 16) finish on the old one.
    let index = |r: &Value| -> usize {
        r["id"].as_str().unwrap()["load-".len()..]
            .parse()
            .unwrap_or(0)
    };
    let first_new = results
        .iter()
        .filter(|(_, r)| r["model"]["version"] == "2.0.0")
        .map(|(_, r)| index(r))
        .min()
        .expect("served by the new bundle");
    let late_old: Vec<usize> = results
        .iter()
        .filter(|(_, r)| r["model"]["version"] != "2.0.0" && index(r) > first_new)
        .map(|(_, r)| index(r))
        .collect();
    assert!(
        late_old.iter().all(|&i| i <= first_new + 16),
        "old model after the switch: {late_old:?} (first new {first_new})"
    );
    let first_new = results
        .iter()
        .position(|(_, r)| r["model"]["version"] == "2.0.0")
        .unwrap();
    // The swap pause: the longest gap between results around the switch.
    let pause = results
        .windows(2)
        .skip(first_new.saturating_sub(5))
        .take(10)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap();
    // The trial ends after trial_secs of healthy service.
    let ended = |s: &Value| s["on_trial"] == false && s["serving"]["version"] == "2.0.0";
    let s = match statuses.iter().find(|s| ended(s)) {
        Some(s) => s.clone(),
        None => status_until(&mut sub, &status_topic, ended).await,
    };
    assert_eq!(s["serving"]["version"], "2.0.0");
    let rss_after = rss_mib(pid);
    println!(
        "update under load: {sent} messages, 0 lost, 0 processed twice ({repeated} QoS 1 \
         repeats of a stored result); swap pause {} ms; RSS {rss_before:.0} MiB before, \
         {peak:.0} MiB peak, {rss_after:.0} MiB after",
        pause.as_millis()
    );
    // The old engine is dropped: memory is back near one model's.
    assert!(
        rss_after < rss_before * 1.25 + 20.0,
        "RSS {rss_after} after, {rss_before} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_after_activation_rolls_back() {
    let (broker, dir, k, config) = rig("");
    let cfg = config.to_str().unwrap();
    let b = bundle(dir.path(), "2.0.0", Some(&k));
    slmd_cmd(
        &[
            "model",
            "install",
            b.to_str().unwrap(),
            "--activate",
            "--config",
            cfg,
        ],
        &[],
    );
    let crash = [("SLMD_FAULT_CRASH_ON_VERSION", "2.0.0")];
    // max_trial_starts = 2: two starts crash, the third rolls back.
    for n in 1..=2 {
        let log = dir.path().join(format!("crash-{n}.log"));
        let mut daemon = Daemon::start_env(&config, &broker.url(), &log, &crash);
        let code = daemon.exit_code(Duration::from_secs(120)).await;
        assert_eq!(
            code,
            None,
            "start {n} should die by a signal: {}",
            daemon.log_text()
        );
        assert!(
            daemon
                .log_text()
                .contains("SLMD_FAULT_CRASH_ON_VERSION=2.0.0: killing the process"),
            "{}",
            daemon.log_text()
        );
    }
    let mut sub = Client::connect(broker.port, &["test/out/#"]).await;
    let log = dir.path().join("after.log");
    let mut daemon = Daemon::start_env(&config, &broker.url(), &log, &crash);
    daemon.wait_subscribed().await;
    assert!(
        daemon.log_text().contains("crash loop"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        serving_model(&mut sub, "after").await["version"],
        Value::Null
    );
    let listed = slmd_cmd(&["model", "bundles", "--config", cfg], &[]);
    assert!(listed.contains("\"outcome\": \"rolled_back\""), "{listed}");
    // And by hand: activate it again, then roll back.
    daemon.terminate();
    slmd_cmd(&["model", "activate", "2.0.0", "--config", cfg], &[]);
    let rolled = slmd_cmd(&["model", "rollback", "--config", cfg], &[]);
    assert!(rolled.contains("the [model] model"), "{rolled}");
    let manifests = crate::util::repo_root().join("models");
    let listed = slmd_cmd(
        &["model", "list", "--config", cfg, "--manifests"],
        &[manifests.to_str().unwrap()],
    );
    assert!(
        listed.contains("bundles") && listed.contains("2.0.0\tsmol"),
        "{listed}"
    );
}

/// A request wrapped with its minisign signature.
pub(crate) fn signed(k: &Keys, request: &Value) -> String {
    let text = request.to_string();
    let sig = slmd::bundle::sign::sign(text.as_bytes(), &k.secret, None).unwrap();
    serde_json::json!({"signed": text, "signature": sig}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_sent_in_chunks_over_mqtt_resumes_after_a_restart_and_serves() {
    use base64::Engine as _;
    use sha2::Digest;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let config = write_config(
        dir.path(),
        broker.port,
        &updates(&k, "require_signed_requests = true"),
    );
    let id = client_id(&config);
    let (control, status_topic) = (
        format!("slmd/{id}/model/update"),
        format!("slmd/{id}/model/status"),
    );
    let mut sub = Client::connect(broker.port, &["test/out/#", &status_topic]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;

    let b = bundle(dir.path(), "2.0.0", Some(&k));
    let bytes = std::fs::read(&b).unwrap();
    // Unsigned requests are refused when signatures are required.
    sub.publish(&control, format!(r#"{{"source": "{}"}}"#, b.display()))
        .await;
    let s = status_until(&mut sub, &status_topic, |s| s["state"] == "refused").await;
    assert_eq!(s["reason"], "unsigned", "{s}");

    const CHUNK: usize = 256 << 10;
    let announce = signed(
        &k,
        &serde_json::json!({"transfer": {
            "id": "smol-2", "size": bytes.len(), "chunk_size": CHUNK,
            "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
        }}),
    );
    let chunks: Vec<String> = bytes
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            serde_json::json!({"chunk": {
                "transfer": "smol-2", "index": i,
                "sha256": hex::encode(sha2::Sha256::digest(c)),
                "data": base64::engine::general_purpose::STANDARD.encode(c),
            }})
            .to_string()
        })
        .collect();
    let total = chunks.len();
    let receiving = |s: &Value| s["state"] == "receiving" && s["transfer"] == "smol-2";
    sub.publish(&control, announce.clone()).await;
    let s = status_until(&mut sub, &status_topic, receiving).await;
    assert_eq!(s["received"], 0);
    // About half the chunks, waiting for the report of every 16th, and 3
    // more; then the daemon dies.
    let base = total / 2 / 16 * 16;
    for (n, c) in chunks[..base + 3].iter().enumerate() {
        sub.publish(&control, c.clone()).await;
        if (n + 1) % 16 == 0 {
            status_until(&mut sub, &status_topic, |s| {
                receiving(s) && s["received"].as_u64() >= Some(n as u64 + 1)
            })
            .await;
        }
    }
    daemon.kill();
    let log = dir.path().join("second.log");
    let mut daemon = Daemon::start_logged(&config, &broker.url(), &log);
    daemon.wait_subscribed().await;
    // Announcing again says what is still missing (the 3 unreported chunks
    // may or may not be in by then); send from the first missing one.
    sub.publish(&control, announce).await;
    let s = status_until(&mut sub, &status_topic, receiving).await;
    let received = s["received"].as_u64().unwrap() as usize;
    assert!((base..=base + 3).contains(&received), "{s}");
    let resume = s["missing"][0].as_u64().unwrap() as usize;
    assert!(resume >= base, "{s}");
    for (n, c) in chunks.iter().enumerate().skip(resume) {
        sub.publish(&control, c.clone()).await;
        if (n + 1) % 16 == 0 {
            status_until(&mut sub, &status_topic, |s| {
                s["state"] != "receiving" || s["received"].as_u64() >= Some(n as u64 + 1)
            })
            .await;
        }
    }
    let s = status_until(&mut sub, &status_topic, |s| {
        s["serving"]["version"] == "2.0.0"
    })
    .await;
    assert_eq!(s["last"]["outcome"], "activated", "{s}");
    assert_eq!(serving_model(&mut sub, "after").await["version"], "2.0.0");
    // The assembled file is gone once installed.
    let left = std::fs::read_dir(dir.path().join("state/bundles/.transfers"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

#[test]
fn signatures_interoperate_with_the_minisign_tool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new("minisign")
            .args(args)
            .current_dir(d)
            .output()
            .expect("minisign (scripts/setup.sh installs it)");
        assert!(out.status.success(), "minisign {args:?}: {out:?}");
    };
    // Signed by minisign, verified by slmd.
    run(&["-G", "-W", "-p", "tool.pub", "-s", "tool.key"]);
    let public = std::fs::read_to_string(d.join("tool.pub")).unwrap();
    let public = public.lines().nth(1).unwrap();
    let model = model_path();
    let manifest = format!(
        "name = \"smol\"\nversion = \"1.0.0\"\nmodel_sha256 = \"{}\"\nmodel_size = {}\n\
         licence = \"Apache-2.0\"\nprompt_format = \"chatml\"\n",
        slmd_engine::models::sha256_file(&model).unwrap(),
        std::fs::metadata(&model).unwrap().len()
    );
    std::fs::write(d.join("manifest.toml"), &manifest).unwrap();
    run(&["-S", "-s", "tool.key", "-m", "manifest.toml"]);
    let sig = std::fs::read_to_string(d.join("manifest.toml.minisig")).unwrap();
    let b = d.join("tool.slmdb");
    slmd::bundle::pack(&b, &manifest, Some(&sig), &model).unwrap();
    let config = write_config(
        d,
        1,
        &format!("\n[updates]\ntrusted_keys = [\"{public}\"]\n"),
    );
    let out = slmd_cmd(
        &[
            "model",
            "verify",
            b.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.contains("verified (signed"), "{out}");
    // Signed by slmd, verified by minisign.
    let k = keys(d, "ours");
    let ours = bundle(d, "2.0.0", Some(&k));
    let unpacked = d.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    slmd::bundle::unpack(&ours, &unpacked).unwrap();
    run(&[
        "-V",
        "-p",
        d.join("ours.pub").to_str().unwrap(),
        "-m",
        unpacked.join("manifest.toml").to_str().unwrap(),
    ]);
}
