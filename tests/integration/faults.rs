//! Fault tests: a real mosquitto, the real daemon process and the real
//! model, loopback only. Each scenario prints a table row (run with
//! `--nocapture` to see it; docs/RELIABILITY.md holds the figures):
//! messages sent, results delivered, lost, processed twice, byte-identical
//! redeliveries, and inputs the producer had to send again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proxy::{Mode, Proxy};
use crate::util::{free_port, write_config, Broker, Client, Daemon, Msg};

const TEXTS: &[&str] = &[
    "turn off the lights",
    "make me a coffee",
    "start the vacuum cleaner",
    "dim the lights in the bedroom",
    "switch the lights on",
    "change the lights to blue",
];
const RESULTS: &[&str] = &["test/out/#", "test/err/#", "slmd/dead-letter"];

/// `n` JSON inputs with ids `PREFIX-i`.
fn inputs(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let body = serde_json::json!({"id": id, "text": TEXTS[i % TEXTS.len()]});
            (id, body.to_string().into_bytes())
        })
        .collect()
}

/// Publishes the inputs, one every `gap`, from a task of its own.
fn publish_paced(
    producer: &Client,
    inputs: &[(String, Vec<u8>)],
    gap: Duration,
) -> tokio::task::JoinHandle<()> {
    let client = producer.client.clone();
    let inputs = inputs.to_vec();
    tokio::spawn(async move {
        for (i, (_, payload)) in inputs.into_iter().enumerate() {
            let topic = format!("test/home/room{}", i % 4);
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    })
}

/// What the consumer of results saw.
#[derive(Default)]
struct Ledger {
    first: HashMap<String, Vec<u8>>,
    dead: HashSet<String>,
    /// The same bytes again: a republish (at-least-once), harmless.
    repeats: usize,
    /// A different result for an id already answered: processed twice.
    twice: Vec<String>,
    /// Inputs the producer published again because no result came.
    resent: usize,
}

impl Ledger {
    fn id(m: &Msg) -> String {
        m.json()["id"]
            .as_str()
            .expect("every output has an id")
            .to_owned()
    }

    /// Whether this is the first output for its id.
    fn is_new(&self, m: &Msg) -> bool {
        !self.first.contains_key(&Ledger::id(m))
    }

    fn record(&mut self, m: &Msg) {
        let id = Ledger::id(m);
        if m.topic == "slmd/dead-letter" {
            self.dead.insert(id.clone());
        }
        match self.first.get(&id) {
            Some(before) if before == &m.payload => self.repeats += 1,
            Some(_) => self.twice.push(id),
            None => {
                self.first.insert(id, m.payload.clone());
            }
        }
    }

    fn missing<'a>(&self, inputs: &'a [(String, Vec<u8>)]) -> Vec<&'a (String, Vec<u8>)> {
        inputs
            .iter()
            .filter(|(id, _)| !self.first.contains_key(id))
            .collect()
    }

    /// Reads outputs until every input has one, or nothing came for `quiet`.
    async fn collect(&mut self, sub: &mut Client, inputs: &[(String, Vec<u8>)], quiet: Duration) {
        while !self.missing(inputs).is_empty() {
            match sub.next(quiet).await {
                Some(m) => self.record(&m),
                None => return,
            }
        }
        // Late republishes would show up here.
        while let Some(m) = sub.next(Duration::from_millis(500)).await {
            self.record(&m);
        }
    }

    /// The producer's end-to-end retry: publish again what got no output.
    async fn resend_missing(&mut self, producer: &Client, inputs: &[(String, Vec<u8>)]) {
        let missing: Vec<_> = self.missing(inputs).into_iter().cloned().collect();
        self.resent += missing.len();
        publish_paced(producer, &missing, Duration::ZERO)
            .await
            .unwrap();
    }

    /// Prints the scenario's row and checks the guarantees.
    fn report(&self, scenario: &str, inputs: &[(String, Vec<u8>)]) {
        let lost = self.missing(inputs).len();
        eprintln!(
            "FAULTS | {scenario} | {} | {} | {lost} | {} | {} | {} |",
            inputs.len(),
            self.first.len() - self.dead.len(),
            self.twice.len(),
            self.repeats,
            self.resent
        );
        assert_eq!(lost, 0, "{scenario}: inputs without an output");
        assert!(
            self.twice.is_empty(),
            "{scenario}: processed twice: {:?}",
            self.twice
        );
    }
}

/// Adds lines to the `[limits]` table of a test config.
fn set_limits(config: &Path, lines: &str) {
    edit(config, "[limits]\n", &format!("[limits]\n{lines}\n"));
}

fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} is not in the config");
    std::fs::write(config, text.replacen(from, to, 1)).unwrap();
}

/// `slmd status` for a config, parsed.
fn status(config: &Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slmd"))
        .args(["status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "slmd status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A small deterministic generator, seeded from the clock and printed, so a
/// failing schedule can be read from the log.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            | 1;
        eprintln!("fault schedule seed: {seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A broker, a config in a temp dir, and a results subscriber.
struct Setup {
    broker: Broker,
    dir: tempfile::TempDir,
    config: PathBuf,
    sub: Client,
    producer: Client,
}

impl Setup {
    async fn new(broker: Broker, limits: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), broker.port, "");
        set_limits(&config, limits);
        let sub = Client::connect(broker.port, RESULTS).await;
        let producer = Client::connect(broker.port, &[]).await;
        Setup {
            broker,
            dir,
            config,
            sub,
            producer,
        }
    }

    fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("run-{n}.log"))
    }

    async fn daemon(&self, n: usize, url: &str) -> Daemon {
        let mut d = Daemon::start_logged(&self.config, url, &self.log(n));
        d.wait_subscribed().await;
        d
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let mut s = Setup::new(Broker::start(), "max_attempts = 10").await;
    let url = s.broker.url();
    let mut daemon = s.daemon(0, &url).await;
    let inputs = inputs("kill", 500);
    // 10 s of input, so that the kills fall in the flow.
    let pacer = publish_paced(&s.producer, &inputs, Duration::from_millis(20));
    let mut rng = Rng::seeded();
    let mut ledger = Ledger::default();
    for n in 1..=6 {
        // Anywhere from model loading to full flow.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(2500))).await;
        if n % 2 == 0 {
            // Or the moment a consumer sees a new result: whatever was
            // published with it must be durable by then, or it runs again.
            while let Some(m) = s.sub.next(Duration::ZERO).await {
                ledger.record(&m);
            }
            while let Some(m) = s.sub.next(Duration::from_secs(10)).await {
                let new = ledger.is_new(&m);
                ledger.record(&m);
                if new {
                    break;
                }
            }
        }
        daemon.kill();
        daemon = Daemon::start_logged(&s.config, &url, &s.log(n));
    }
    pacer.await.unwrap();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(60))
        .await;
    ledger.report(
        "SIGKILL x6 at random points, every other as a result arrives",
        &inputs,
    );
    assert_eq!(ledger.resent, 0);
    assert!(ledger.dead.is_empty(), "dead letters: {:?}", ledger.dead);
    drop(daemon);
}

async fn broker_restart(persistence: bool) {
    let broker = Broker::start_with(free_port(), persistence);
    let mut s = Setup::new(broker, "").await;
    let url = s.broker.url();
    let daemon = s.daemon(0, &url).await;
    let inputs = inputs(if persistence { "bp" } else { "bn" }, 200);
    let pacer = publish_paced(&s.producer, &inputs, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.broker.restart();
    pacer.await.unwrap();
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(20))
        .await;
    if !persistence {
        // The broker forgot what it held (queued input, sessions): the
        // producer retries, and slmd's dedup makes that safe.
        ledger.resend_missing(&s.producer, &inputs).await;
        ledger
            .collect(&mut s.sub, &inputs, Duration::from_secs(20))
            .await;
    }
    let name = if persistence {
        "broker stopped 3 s, persistence on"
    } else {
        "broker stopped 3 s, persistence off"
    };
    ledger.report(name, &inputs);
    if persistence {
        assert_eq!(ledger.resent, 0);
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_with_persistence_loses_and_doubles_nothing() {
    broker_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_without_persistence_loses_nothing_slmd_acknowledged() {
    broker_restart(false).await;
}

/// The daemon reaches the broker through a proxy that cuts the link for
/// longer than the keep-alive (5 s) while work is queued in its inbox.
async fn network_cut(mode: Mode) {
    let mut s = Setup::new(Broker::start(), "").await;
    edit(&s.config, "keep_alive_secs = 30", "keep_alive_secs = 5");
    let proxy = Proxy::start(s.broker.port).await;
    let daemon = s.daemon(0, &proxy.url()).await;
    let inputs = inputs(if mode == Mode::Stall { "stall" } else { "drop" }, 200);
    let pacer = publish_paced(&s.producer, &inputs, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(mode);
    let (mut produced_while_cut, mut saw_disconnected) = (0, false);
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let st = status(&s.config);
        produced_while_cut = produced_while_cut.max(st["outbox"].as_u64().unwrap());
        saw_disconnected |= st["connected"] == false;
    }
    proxy.set(Mode::Forward);
    pacer.await.unwrap();
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(30))
        .await;
    let name = format!("network {mode:?} 15 s (keep-alive 5 s)").to_lowercase();
    ledger.report(&name, &inputs);
    assert_eq!(ledger.resent, 0);
    assert!(saw_disconnected, "slmd status never showed the link down");
    assert!(
        produced_while_cut > 0,
        "no result waited in the outbox while the network was cut"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_stall_longer_than_keepalive_loses_and_doubles_nothing() {
    network_cut(Mode::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_drop_longer_than_keepalive_loses_and_doubles_nothing() {
    network_cut(Mode::Drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_quota_holds_input_at_the_broker_and_recovers() {
    let mut s = Setup::new(Broker::start(), "max_store_bytes = 8192").await;
    let url = s.broker.url();
    let daemon = s.daemon(0, &url).await;
    let inputs = inputs("quota", 200);
    // At full speed: the inbox outgrows the quota within a second.
    publish_paced(&s.producer, &inputs, Duration::ZERO)
        .await
        .unwrap();
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(30))
        .await;
    ledger.report("store quota 8 KiB, 200 messages at once", &inputs);
    assert_eq!(ledger.resent, 0);
    let log = daemon.log_text();
    assert!(
        log.contains("store quota of 8192 bytes reached"),
        "the quota was never reached:\n{log}"
    );
    assert!(log.contains("reconnecting so the broker redelivers what it held"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_the_engine_goes_to_the_dead_letters_and_only_it() {
    // One message kills the process whenever the engine gets it, as a
    // message that crashed llama.cpp would; its neighbours in the same
    // batch are blamed once with it, and must not be dead-lettered.
    const POISON: &str = "this one crashes the engine";
    let mut s = Setup::new(Broker::start(), "max_attempts = 2\nmax_in_flight = 4").await;
    let url = s.broker.url();
    let mut inputs = inputs("dl", 30);
    let poison_id = inputs[5].0.clone();
    inputs[5].1 = serde_json::json!({"id": poison_id, "text": POISON})
        .to_string()
        .into_bytes();
    let (config, logs) = (s.config.clone(), s.dir.path().to_owned());
    let start = |n: usize| {
        let log = logs.join(format!("run-{n}.log"));
        Daemon::start_env(&config, &url, &log, &[("SLMD_FAULT_CRASH_ON", POISON)])
    };
    let mut daemon = start(0);
    daemon.wait_subscribed().await;
    publish_paced(&s.producer, &inputs, Duration::ZERO)
        .await
        .unwrap();
    let mut ledger = Ledger::default();
    let mut runs = 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ledger.missing(&inputs).is_empty() && Instant::now() < deadline {
        if let Some(m) = s.sub.next(Duration::from_millis(500)).await {
            ledger.record(&m);
        }
        if !daemon.is_running() {
            daemon = start(runs);
            runs += 1;
        }
    }
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(5))
        .await;
    ledger.report("engine crash on one message, max_attempts = 2", &inputs);
    assert_eq!(
        ledger.dead.iter().collect::<Vec<_>>(),
        [&poison_id],
        "only the crashing message is a dead letter"
    );
    assert_eq!(
        runs, 3,
        "it crashed the engine max_attempts times, then no more"
    );
    let dead: serde_json::Value = serde_json::from_slice(&ledger.first[&poison_id]).unwrap();
    assert_eq!(dead["error"]["reason"], "too_many_attempts");
    assert_eq!(dead["task"], "home");
    assert_eq!(dead["payload"].as_str().unwrap().as_bytes(), inputs[5].1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = status(&s.config);
    assert_eq!(st["dead_letters"], 1, "{st}");
    assert!(st["pid"].is_u64(), "a running daemon's snapshot: {st}");
    let log = std::fs::read_to_string(s.log(1)).unwrap();
    assert!(log.contains("handed to the engine"), "{log}");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_splits_work_between_two_instances() {
    let broker = Broker::start();
    let mut sub = Client::connect(broker.port, RESULTS).await;
    let producer = Client::connect(broker.port, &[]).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut daemons = Vec::new();
    for d in &dirs {
        let config = write_config(d.path(), broker.port, "");
        edit(
            &config,
            r#"["test/home/+"]"#,
            r#"["$share/slmd/test/home/+"]"#,
        );
        let mut daemon = Daemon::start(&config, &broker.url());
        daemon.wait_subscribed().await;
        daemons.push(daemon);
    }
    let inputs = inputs("shared", 100);
    publish_paced(&producer, &inputs, Duration::from_millis(5))
        .await
        .unwrap();
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut sub, &inputs, Duration::from_secs(30))
        .await;
    ledger.report("two instances, one shared subscription", &inputs);
    let counts: Vec<usize> = daemons
        .iter()
        .map(|d| {
            d.log_text()
                .lines()
                .filter(|l| l.contains("task=home msg_id=shared-") && l.contains(" label="))
                .count()
        })
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), inputs.len(), "{counts:?}");
    assert!(
        counts.iter().all(|&c| c > 0),
        "one instance got no work: {counts:?}"
    );
}

#[tokio::test]
async fn a_damaged_store_is_refused_by_name_and_kept() {
    // Nothing listens on this port: the store is checked before connecting.
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    // 1. The store path is not a directory.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), port, "");
    let store = dir.path().join("state/store");
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    std::fs::write(&store, "not a store").unwrap();
    let mut daemon = Daemon::start(&config, &url);
    assert_ne!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("cannot open the store at {}", store.display())),
        "{log}"
    );
    assert!(log.contains("move the directory aside"), "{log}");
    assert_eq!(std::fs::read(&store).unwrap(), b"not a store");

    // 2. A store with messages in it, then its files overwritten.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), port, "");
    let state = dir.path().join("state");
    {
        let s = slmd::store::Store::open(&state).unwrap();
        s.append_inbox(&slmd::store::InboxEntry {
            received_ms: 1,
            dup: false,
            reply: None,
            topic: "test/home/x".into(),
            payload: b"turn off the lights".to_vec(),
            truncated_from: None,
        })
        .unwrap();
        s.flush().await.unwrap();
    }
    let mut damaged = Vec::new();
    for entry in std::fs::read_dir(state.join("store")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
            std::fs::write(&path, &garbage).unwrap();
            damaged.push((path, garbage));
        }
    }
    assert!(!damaged.is_empty());
    let mut daemon = Daemon::start(&config, &url);
    assert_ne!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains(&state.join("store").display().to_string()),
        "{log}"
    );
    for (path, garbage) in damaged {
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage,
            "{} was changed",
            path.display()
        );
    }
}
