//! Fault tests: a real mosquitto, the real daemon process and the real
//! model, loopback only. Each scenario prints a table row (run with
//! `--nocapture` to see it; docs/RELIABILITY.md holds the figures):
//! messages sent, results delivered, lost, processed twice, byte-identical
//! redeliveries, and inputs the producer had to send again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proxy::{Mode, Proxy};
use crate::util::{edit, free_port, write_config, Broker, Client, Daemon, Msg};

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
        let faults = self.check(scenario, inputs);
        assert!(faults.is_empty(), "{scenario}: {faults:#?}");
    }

    /// Prints the scenario's row; the broken guarantees, each in words.
    fn check(&self, scenario: &str, inputs: &[(String, Vec<u8>)]) -> Vec<String> {
        let missing = self.missing(inputs);
        eprintln!(
            "FAULTS | {scenario} | {} | {} | {} | {} | {} | {} |",
            inputs.len(),
            self.first.len() - self.dead.len(),
            missing.len(),
            self.twice.len(),
            self.repeats,
            self.resent
        );
        let mut faults = Vec::new();
        if !missing.is_empty() {
            let ids: Vec<&str> = missing.iter().take(20).map(|(id, _)| id.as_str()).collect();
            faults.push(format!(
                "{} input(s) lost (no output at all), first: {ids:?}",
                missing.len()
            ));
        }
        if !self.twice.is_empty() {
            faults.push(format!(
                "{} id(s) processed twice (two different results): {:?}",
                self.twice.len(),
                self.twice
            ));
        }
        faults
    }
}

/// Adds lines to the `[limits]` table of a test config.
fn set_limits(config: &Path, lines: &str) {
    edit(config, "[limits]\n", &format!("[limits]\n{lines}\n"));
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

/// A crash blames what the model was working on, not what waited in the
/// engine's queue. The inference thread wedges on one message (as a
/// backend that hangs would) while seven more wait behind it; the process
/// is then killed. With `max_attempts = 1` one blame is a dead letter, so
/// blaming the queue would dead-letter all eight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_blames_the_batch_on_the_model_not_the_queue_behind_it() {
    const STALL: &str = "the engine hangs on this one";
    let mut s = Setup::new(Broker::start(), "max_attempts = 1\nmax_in_flight = 8").await;
    let url = s.broker.url();
    let mut inputs = inputs("q", 8);
    let hung = inputs[0].0.clone();
    inputs[0].1 = serde_json::json!({"id": hung, "text": STALL})
        .to_string()
        .into_bytes();
    let mut daemon = Daemon::start_env(
        &s.config,
        &url,
        &s.log(0),
        &[("SLMD_FAULT_STALL_ON", STALL)],
    );
    daemon.wait_subscribed().await;
    publish_paced(&s.producer, &inputs[..1], Duration::ZERO)
        .await
        .unwrap();
    assert!(
        logged(&mut daemon, "stalling the thread", Duration::from_secs(30)).await,
        "the engine never took the message: {}",
        daemon.log_text()
    );
    publish_paced(&s.producer, &inputs[1..], Duration::ZERO)
        .await
        .unwrap();
    // Received, stored and handed to the engine's queue in milliseconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        s.sub.next(Duration::ZERO).await.is_none(),
        "nothing runs past the hang"
    );
    daemon.kill();
    let daemon = Daemon::start_logged(&s.config, &url, &s.log(1));
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(60))
        .await;
    ledger.report(
        "SIGKILL while the engine hangs on one of 8 (max_attempts 1)",
        &inputs,
    );
    assert_eq!(
        ledger.dead.iter().collect::<Vec<_>>(),
        [&hung],
        "only the message the model was on is blamed"
    );
    let log = daemon.log_text();
    assert!(log.contains("did not stop cleanly: 1 message(s)"), "{log}");
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
        let s = slmd_store::Store::open(&state).unwrap();
        s.append_inbox(&slmd_store::InboxEntry {
            received_ms: 1,
            dup: false,
            reply: None,
            topic: "test/home/x".into(),
            payload: b"turn off the lights".to_vec(),
            truncated: None,
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

/// `SLMD_LONG_FAULTS=1` selects the on-demand variants of the issue-28
/// tests below (more messages, more kills); CI runs the bounded ones.
fn long_run() -> bool {
    std::env::var_os("SLMD_LONG_FAULTS").is_some_and(|v| v == "1")
}

/// Waits until the daemon's log holds `needle`: false if the daemon
/// exited or the time ran out first (a kill schedule must not panic on a
/// daemon that is slower than planned).
async fn logged(d: &mut Daemon, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if d.log_text().contains(needle) {
            return true;
        }
        if !d.is_running() || Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The harness's moment to kill a daemon it has just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    /// 0-300 ms after the spawn: before the store opens, or just after it
    /// (when a crashed run's suspects have just been blamed).
    Spawn,
    /// A random moment while the model loads and the heads are read.
    Load,
    /// 0.5-4 s after subscribing, with messages flowing.
    Flow,
    /// The moment the consumer sees a new result.
    NewResult,
}

/// How far a daemon had got when it was killed, read from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// The store was not open yet.
    Starting,
    /// Store open, model loading (the engine had nothing).
    Loading,
    /// Model loaded, not yet subscribed.
    Connecting,
    /// Subscribed: messages flowing.
    Flowing,
}

impl Phase {
    fn of(log: &str) -> Phase {
        if log.contains("subscribed to") {
            Phase::Flowing
        } else if log.contains("serving with") {
            Phase::Connecting
        } else if log.contains("store open at") {
            Phase::Loading
        } else {
            Phase::Starting
        }
    }
}

/// Issue 28, fault 1: kills while the daemon starts must blame nobody. A
/// message that never reached the engine is not a suspect, however often
/// the daemon died before loading its model.
///
/// Every kill is a SIGKILL; the pattern puts runs of two to three start-up
/// kills after a kill in the flow, when the inbox holds the broker's
/// backlog: before the fix, every start blamed the oldest `max_in_flight`
/// waiting messages, and the third such start in a row dead-lettered them.
///
/// Asserted: every id has an output (0 lost); no id has two different
/// results (0 processed twice: each processing stores a fresh
/// `latency_ms`); byte-identical copies are counted, not failed, because
/// RELIABILITY.md promises results at least once, byte for byte; and no
/// dead letter that a kill before the model was loaded helped to make
/// (see [`blames_explained`]; no input here crashes the engine, but a kill
/// can land while the same suspect runs, as a crashing input would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_startup_and_load_blames_nobody() {
    use KillAt::{Flow, Load, NewResult, Spawn};
    let (messages, rounds) = if long_run() { (5000, 6) } else { (1000, 2) };
    const PATTERN: [KillAt; 10] = [
        NewResult, Spawn, Load, Load, Flow, Load, Load, Spawn, NewResult, Load,
    ];
    let schedule: Vec<KillAt> = PATTERN.iter().copied().cycle().take(10 * rounds).collect();
    // Default max_attempts (3): the limit users run with.
    let mut s = Setup::new(Broker::start(), "").await;
    // One inference thread: on a shared 2-core machine llama.cpp's two
    // spinning threads lose most of their time to each other and the
    // other load, and the runs in the flow finished almost nothing.
    edit(&s.config, "threads = 2", "threads = 1");
    let url = s.broker.url();
    let started = Instant::now();
    let mut daemon = s.daemon(0, &url).await;
    eprintln!("first start (heads trained): {:?}", started.elapsed());
    let inputs = inputs("boot", messages);
    // Input spread over about the time the kills take (0.75 s each).
    let gap = Duration::from_millis((750 * schedule.len() / messages) as u64);
    let pacer = publish_paced(&s.producer, &inputs, gap);
    let mut rng = Rng::seeded();
    let mut ledger = Ledger::default();
    let mut load_ms = 1500u64;
    let mut phases = Vec::new();
    for (n, &at) in schedule.iter().enumerate() {
        match at {
            Spawn => tokio::time::sleep(Duration::from_millis(rng.below(300))).await,
            Load => {
                if logged(&mut daemon, "store open at", Duration::from_secs(30)).await {
                    let ms = rng.below(load_ms.max(20));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            Flow | NewResult => {
                if logged(&mut daemon, "store open at", Duration::from_secs(30)).await {
                    let opened = Instant::now();
                    if logged(&mut daemon, "serving with", Duration::from_secs(120)).await {
                        load_ms = opened.elapsed().as_millis() as u64;
                    }
                }
                daemon.wait_subscribed().await;
                if at == Flow {
                    let ms = 500 + rng.below(3500);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                } else {
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
            }
        }
        daemon.kill();
        // Read once the process is dead: the log then holds all it did.
        phases.push((at, Phase::of(&daemon.log_text())));
        let log = s.log(n + 1);
        daemon = if n + 1 < schedule.len() {
            Daemon::start_logged(&s.config, &url, &log)
        } else {
            // The last run is never killed. It drains the backlog without
            // the model (at hundreds of messages a second, not tens) to
            // keep the test within its time; blame happens as the store
            // opens, before any engine, so this run judges the kills as
            // the others did, and a second processing of an id would still
            // show as a second, different result.
            Daemon::start_args(&s.config, &url, &log, &["--no-inference"])
        };
    }
    let killed = started.elapsed();
    eprintln!("kills (schedule, phase reached): {phases:?}; model load took {load_ms} ms");
    pacer.await.unwrap();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(60))
        .await;
    let logs: Vec<String> = (0..=schedule.len())
        .map(|n| std::fs::read_to_string(s.log(n)).unwrap_or_default())
        .collect();
    let blamed: usize = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("did not stop cleanly"))
        .count();
    let scenario = format!(
        "SIGKILL x{} during start-up, model load and flow (max_attempts 3)",
        schedule.len()
    );
    let mut faults = ledger.check(&scenario, &inputs);
    // A dead letter is the daemon's answer to a message in the engine at
    // `max_attempts` crashes, and a kill at the moment a result appears can
    // hit the same suspect (running alone) three times. Allowed only when
    // every blame has such a kill to explain it; a blame explained only by
    // kills before the model was loaded is the fault this test is for.
    let mut dead: Vec<&String> = ledger.dead.iter().collect();
    dead.sort();
    for id in &dead {
        if let Err(why) = blames_explained(id, &logs, &phases) {
            faults.push(format!("{id} was dead-lettered: {why}"));
        }
    }
    let before_model = phases.iter().filter(|(_, p)| *p <= Phase::Loading).count();
    let flowing = phases.iter().filter(|(_, p)| *p == Phase::Flowing).count();
    let per_run: Vec<usize> = logs
        .iter()
        .map(|l| {
            l.lines()
                .filter(|l| l.contains("msg_id=boot-") && l.contains(" label="))
                .count()
        })
        .collect();
    let by_model: usize = per_run[..schedule.len()].iter().sum();
    eprintln!("results logged per run: {per_run:?}; dead-lettered: {dead:?}");
    eprintln!(
        "{} kills: {before_model} before the model was loaded, {flowing} in the flow; {blamed} \
         start(s) blamed messages for a crash; {by_model} results by the model before the \
         last run; kills done after {killed:?}, {:?} in all",
        phases.len(),
        started.elapsed()
    );
    assert!(faults.is_empty(), "{scenario}: {faults:#?}");
    assert_eq!(ledger.resent, 0);
    // The schedule did what it says: a quarter of the kills hit the start.
    assert!(
        before_model >= phases.len() / 4,
        "only {before_model} kills landed before the model was loaded: {phases:?}"
    );
    assert!(
        flowing >= phases.len() / 5,
        "only {flowing} kills landed in the flow: {phases:?}"
    );
    drop(daemon);
}

/// Whether each crash that `id` was blamed for hit a run that had loaded
/// its model (`phases[r]` is how far run `r` got) and, from the second on,
/// while the id ran there alone as a suspect. Read from the runs' logs: a
/// suspect is logged with its attempts as it runs, a dead letter with all
/// of them.
fn blames_explained(id: &str, logs: &[String], phases: &[(KillAt, Phase)]) -> Result<(), String> {
    let tag = format!("msg_id={id} ");
    // (run, attempts) at each sighting, in run order.
    let mut seen: Vec<(usize, u32)> = Vec::new();
    for (run, log) in logs.iter().enumerate() {
        for line in log.lines().filter(|l| l.contains(&tag)) {
            let n = if let Some(rest) = line.split("interrupted by ").nth(1) {
                rest.split(' ').next().and_then(|n| n.parse().ok())
            } else if line.contains("suspect: ") {
                line.split("attempts=")
                    .nth(1)
                    .and_then(|n| n.split(' ').next()?.parse().ok())
            } else {
                None
            };
            seen.extend(n.map(|n| (run, n)));
        }
    }
    let loaded = |r: usize| phases.get(r).is_some_and(|(_, p)| *p >= Phase::Connecting);
    let last = seen.last().map_or(0, |&(_, n)| n);
    for k in 1..=last {
        let first = |k: u32| seen.iter().find(|&&(_, n)| n == k).map(|&(r, _)| r);
        let (Some(to), from) = (first(k), if k == 1 { Some(0) } else { first(k - 1) }) else {
            return Err(format!("attempt {k} was never logged: {seen:?}"));
        };
        let Some(from) = from else {
            return Err(format!("attempt {} was never logged: {seen:?}", k - 1));
        };
        let explained = (from..to)
            .any(|r| loaded(r) && (k == 1 || seen.iter().any(|&(sr, n)| sr == r && n == k - 1)));
        if !explained {
            return Err(format!(
                "blame {k} (first seen in run {to}) has no kill of a loaded run with it in the \
                 engine since run {from}; sightings (run, attempts) {seen:?}, phases {phases:?}"
            ));
        }
    }
    Ok(())
}

/// A mosquitto whose log (notices included: that is where it reports
/// dropping a message too large for a client) goes to a file as well.
fn broker_logging_notices() -> (Broker, PathBuf) {
    let dir = Broker::dir();
    let log = dir.path().join("broker.log");
    let extra = format!("log_dest file {}\nlog_type notice\n", log.display());
    (Broker::start_in(dir, free_port(), &extra), log)
}

/// Issue 28, fault 2: payloads of 2 MB in a stream of ordinary ones. Each
/// must get its `too_large` error result, every other message its result,
/// and nothing may stall. Against mosquitto 2.0.11 this needs slmd to
/// accept such packets: a PUBLISH the broker drops as too large for its
/// client keeps one slot of the client's receive maximum for the rest of
/// the connection (database.c drops it without giving back the send
/// quota), so after `max_inflight` drops nothing more is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_in_a_stream_get_errors_and_do_not_stall() {
    let (messages, every) = if long_run() {
        (20_000, 250)
    } else {
        (2_000, 50)
    };
    let (broker, broker_log) = broker_logging_notices();
    let mut s = Setup::new(broker, "").await;
    let url = s.broker.url();
    let mut daemon = Daemon::start_args(&s.config, &url, &s.log(0), &["--no-inference"]);
    daemon.wait_subscribed().await;
    let filler = "x".repeat(2_000_000);
    let mut big = HashSet::new();
    let inputs: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|i| {
            let id = format!("size-{i}");
            let text = if i % every == every / 2 {
                big.insert(id.clone());
                filler.as_str()
            } else {
                TEXTS[i % TEXTS.len()]
            };
            let body = serde_json::json!({"id": id, "text": text});
            (id, body.to_string().into_bytes())
        })
        .collect();
    // More oversized messages than the receive maximum (broker.max_inflight, 32).
    assert!(big.len() >= 40, "{}", big.len());
    let started = Instant::now();
    // 150 messages/s, as in the issue.
    publish_paced(&s.producer, &inputs, Duration::from_micros(6_667))
        .await
        .unwrap();
    let mut ledger = Ledger::default();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(20))
        .await;
    let scenario = format!("{messages} messages, {} of 2 MB, --no-inference", big.len());
    let mut faults = ledger.check(&scenario, &inputs);
    let drops = std::fs::read_to_string(&broker_log)
        .unwrap_or_default()
        .matches("Dropping too large outgoing PUBLISH")
        .count();
    if drops > 0 {
        faults.push(format!(
            "mosquitto dropped {drops} PUBLISH(es) as too large for slmd"
        ));
    }
    let (mut wrong, mut stalled_at) = (Vec::new(), None);
    for (i, (id, _)) in inputs.iter().enumerate() {
        let Some(out) = ledger.first.get(id) else {
            stalled_at = stalled_at.or(Some(i));
            continue;
        };
        let out: serde_json::Value = serde_json::from_slice(out).unwrap();
        let ok = if big.contains(id) {
            out["error"]["reason"] == "too_large"
        } else {
            out["label"].is_string()
        };
        if !ok {
            wrong.push(format!("{id}: {out}"));
        }
    }
    let big_answered = big
        .iter()
        .filter(|id| ledger.first.contains_key(*id))
        .count();
    if big_answered < big.len() {
        faults.push(format!(
            "{} of {} oversized messages got no error result",
            big.len() - big_answered,
            big.len()
        ));
    }
    if let Some(i) = stalled_at {
        let answered_after = inputs[i..]
            .iter()
            .filter(|(id, _)| ledger.first.contains_key(id))
            .count();
        faults.push(format!(
            "first input without an output: #{i} of {messages}; of the {} from there on, {answered_after} \
             got one",
            messages - i
        ));
    }
    if !wrong.is_empty() {
        faults.push(format!(
            "{} wrong outputs: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
    let ids: HashSet<&str> = inputs.iter().map(|(id, _)| id.as_str()).collect();
    let strangers: Vec<String> = ledger
        .first
        .iter()
        .filter(|(id, _)| !ids.contains(id.as_str()))
        .map(|(_, out)| String::from_utf8_lossy(out).into_owned())
        .collect();
    if !strangers.is_empty() {
        // Is it at least the id slmd derives from the whole message?
        let derived: HashSet<String> = inputs
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| big.contains(id))
            .map(|(i, (_, p))| slmd::payload::derived_id(&format!("test/home/room{}", i % 4), p))
            .collect();
        let of_whole = strangers
            .iter()
            .filter(|out| {
                let v: serde_json::Value = serde_json::from_str(out).unwrap();
                derived.contains(v["id"].as_str().unwrap_or_default())
            })
            .count();
        faults.push(format!(
            "{} output(s) under ids no input had ({of_whole} of them the id derived from the whole \
             topic and payload), e.g. {}",
            strangers.len(),
            strangers[0]
        ));
    }
    let connects = daemon.log_text().matches("connected to broker").count();
    eprintln!(
        "oversized: {big_answered}/{} too_large results, broker drops {drops}, slmd connected \
         {connects} time(s), {:?}",
        big.len(),
        started.elapsed()
    );
    assert!(faults.is_empty(), "{scenario}: {faults:#?}");
    drop(daemon);
}

/// A tmpfs of a given size mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Needs root (CI runs the suite as root).
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(at.to_owned()))
    }

    /// Fills the filesystem with `name` until a write fails for space;
    /// the bytes written.
    fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("ballast: {e}"),
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
    }
}

/// `slmd status` with the daemon's `RUNTIME_DIRECTORY`, or why it failed.
fn try_status(config: &Path, runtime: &Path) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slmd"))
        .args(["status", "--config"])
        .arg(config)
        .env("RUNTIME_DIRECTORY", runtime)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Issue 28, fault 3: the state directory on a small filesystem that fills
/// up while messages flow. Input must be held at the broker, `slmd status`
/// must say so and why, and once space is freed every message must get its
/// result without a restart. The daemon runs as the systemd unit runs it,
/// with a `RUNTIME_DIRECTORY` (off the full disk) for its status snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_heals_without_restart() {
    let mut s = Setup::new(Broker::start(), "").await;
    let state = s.dir.path().join("state");
    let disk = match Tmpfs::mount(&state, "32m") {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "SKIPPED a_full_disk_heals_without_restart: cannot mount a tmpfs at {} ({e}); \
                 run the suite as root",
                state.display()
            );
            return;
        }
    };
    let url = s.broker.url();
    let runtime = s.dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let mut daemon = Daemon::start_full(&s.config, &url, &s.log(0), &env, &["--no-inference"]);
    daemon.wait_subscribed().await;
    let pid = daemon.pid();
    let inputs = inputs("disk", 1000);
    // 20 s of input: 3 s before the disk fills, 8 s full, the rest after.
    let pacer = publish_paced(&s.producer, &inputs, Duration::from_millis(20));
    let mut ledger = Ledger::default();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ballast = disk.fill("ballast");
    let full_at = Instant::now();
    let before_full = {
        while let Some(m) = s.sub.next(Duration::ZERO).await {
            ledger.record(&m);
        }
        ledger.first.len()
    };
    // A status file written only on change may be old; what it says must
    // be right: the store cannot take input.
    let (mut said_full, mut oldest, mut unreadable) = (false, 0, Vec::new());
    while full_at.elapsed() < Duration::from_secs(8) {
        while let Some(m) = s.sub.next(Duration::from_millis(500)).await {
            ledger.record(&m);
        }
        match try_status(&s.config, &runtime) {
            Ok(st) => {
                said_full |= st["write_failure"].is_string() && st["quota_full"] == true;
                let age = now_ms().saturating_sub(st["taken_ms"].as_u64().unwrap_or(0));
                oldest = oldest.max(age);
            }
            Err(e) => unreadable.push(e),
        }
    }
    let during_full = ledger.first.len() - before_full;
    std::fs::remove_file(state.join("ballast")).unwrap();
    let freed_at = Instant::now();
    pacer.await.unwrap();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(30))
        .await;
    let healed_in = freed_at.elapsed();
    let mut faults = ledger.check("disk full 8 s mid-stream, no restart", &inputs);
    if !daemon.is_running() || daemon.pid() != pid {
        faults.push("the daemon did not survive the full disk".into());
    }
    if !said_full {
        faults.push(
            "slmd status never said write_failure and quota_full while the disk was full".into(),
        );
    }
    if !unreadable.is_empty() {
        faults.push(format!("slmd status failed: {:?}", &unreadable[..1]));
    }
    // After healing, status no longer says full.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match try_status(&s.config, &runtime) {
        Ok(st) => {
            if !st["write_failure"].is_null() || st["quota_full"] != false {
                faults.push(format!("status still says full after space returned: {st}"));
            }
        }
        Err(e) => faults.push(format!("slmd status failed after space returned: {e}")),
    }
    let log = daemon.log_text();
    let full_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("No space left") || l.contains("StorageFull"))
        .collect();
    let full_errors = full_lines.len();
    if let (Some(first), Some(last)) = (full_lines.first(), full_lines.last()) {
        eprintln!("first and last log lines about the full disk:\n  {first}\n  {last}");
    }
    eprintln!(
        "disk full: ballast {ballast} bytes; {before_full} results before, {during_full} while \
         full (status up to {oldest} ms old then), collecting ended {healed_in:?} after freeing \
         (0.5 s after the last result, or 30 s of quiet); {full_errors} log lines about the \
         full disk"
    );
    drop(daemon);
    drop(disk);
    assert!(faults.is_empty(), "disk full: {faults:#?}");
}

/// Bytes under `dir`: (file lengths, blocks allocated).
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = disk_usage(&e.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

/// Every file under `dir` with its modification time.
fn mtimes(dir: &Path, into: &mut Vec<(PathBuf, std::time::SystemTime)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            mtimes(&e.path(), into);
        } else if let Ok(t) = meta.modified() {
            into.push((e.path(), t));
        }
    }
}

/// Resident set of a process, KiB.
/// A number from /proc/PID/status (`VmRSS:` in KiB, `Threads:`); 0 when gone.
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// Issue 28, fault 4: steady traffic of unique messages, inference off.
/// The store on disk and the daemon's memory must level off: the second
/// half of the run may add at most a tenth to either. The dedup records are
/// bounded at 1 MiB here (reached within the first half) and the quota at
/// 1 MiB. The state directory must not be written while the daemon is
/// idle (flash wear).
///
/// Memory is only comparable between halves when the daemon keeps up: run
/// beside other tests on 2 cores it fell behind, and a backlog is not steady
/// traffic (RSS +36% in CI, +12% locally with three busy loops beside it).
/// So it runs alone: scripts/test.sh runs the ignored tests after the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the machine to itself; scripts/test.sh runs it after the other tests"]
async fn store_and_rss_stay_bounded_under_steady_traffic() {
    // RSS rises over the first 25,000 or so messages (allocator and sled
    // warming up; measured flat from there to 100,000), so the bounded run
    // compares 0-20,000 with 20,000-40,000.
    let messages = if long_run() { 100_000 } else { 40_000 };
    let mut s = Setup::new(
        Broker::start(),
        "max_store_bytes = 1048576\nmax_dedup_bytes = 1048576",
    )
    .await;
    // A 2 MiB page cache (default 8 MiB) fills within the first half, so
    // the second half shows growth that is not the cache filling up.
    edit(&s.config, "[state]\n", "[state]\ncache_bytes = 2097152\n");
    let url = s.broker.url();
    let mut daemon = Daemon::start_args(&s.config, &url, &s.log(0), &["--no-inference"]);
    daemon.wait_subscribed().await;
    let pid = daemon.pid();
    let store = s.dir.path().join("state/store");
    let inputs = inputs("steady", messages);
    let started = Instant::now();
    // 400 messages/s: well within the message path's speed, so the store
    // holds only what is on its way and all growth is bookkeeping. After a
    // stall (CI runs other tests beside this one) the pacer does not catch
    // up in a burst: a backlog is not steady traffic.
    let pacer = {
        let client = s.producer.client.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_micros(2500));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for (i, (_, payload)) in inputs.into_iter().enumerate() {
                pace.tick().await;
                let topic = format!("test/home/room{}", i % 4);
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        })
    };
    let mut ledger = Ledger::default();
    // (delivered, store bytes, store blocks, RSS KiB, threads)
    let mut samples: Vec<(usize, u64, u64, u64, u64)> = Vec::new();
    let mut last_progress = Instant::now();
    while ledger.first.len() < messages && last_progress.elapsed() < Duration::from_secs(30) {
        let before = ledger.first.len();
        let tick = Instant::now();
        while tick.elapsed() < Duration::from_secs(1) {
            match s.sub.next(Duration::from_millis(200)).await {
                Some(m) => ledger.record(&m),
                None => continue,
            }
        }
        if ledger.first.len() > before {
            last_progress = Instant::now();
        }
        let (bytes, blocks) = disk_usage(&store);
        let threads = proc_status(pid, "Threads:");
        samples.push((ledger.first.len(), bytes, blocks, rss_kib(pid), threads));
    }
    pacer.await.unwrap();
    ledger
        .collect(&mut s.sub, &inputs, Duration::from_secs(10))
        .await;
    let (bytes, blocks) = disk_usage(&store);
    let threads = proc_status(pid, "Threads:");
    samples.push((ledger.first.len(), bytes, blocks, rss_kib(pid), threads));
    let elapsed = started.elapsed();
    for (i, s) in samples.iter().enumerate() {
        if i % 5 == 0 || i + 1 == samples.len() {
            eprintln!(
                "GROWTH | {} delivered | store {} bytes ({} allocated) | RSS {} KiB | {} threads |",
                s.0, s.1, s.2, s.3, s.4
            );
        }
    }
    let mut faults = ledger.check(
        &format!("{messages} unique messages, --no-inference"),
        &inputs,
    );
    // Peaks, not points: sled's log file grows and shrinks as it cleans
    // segments (3.7-5.2 MB measured on a bounded store), so two single
    // samples could differ by a third either way.
    let peak = |second: bool, f: fn(&(usize, u64, u64, u64, u64)) -> u64| {
        samples
            .iter()
            .filter(|s| (s.0 >= messages / 2) == second)
            .map(f)
            .max()
            .unwrap_or(0)
    };
    let (store_1, store_2) = (peak(false, |s| s.1), peak(true, |s| s.1));
    let (rss_1, rss_2) = (peak(false, |s| s.3), peak(true, |s| s.3));
    let threads = peak(false, |s| s.4).max(peak(true, |s| s.4));
    // What the configuration bounds: quota plus dedup records.
    let bound = 2u64 << 20;
    eprintln!(
        "peaks, first half -> second half: store {store_1} -> {store_2} bytes ({:.1}x the quota \
         plus the dedup bound), RSS {rss_1} -> {rss_2} KiB, at most {threads} threads; {elapsed:?}",
        store_2 as f64 / bound as f64
    );
    // sled's file moves in 512 KiB segments and swings by several of them
    // as it cleans (3.7-8.4 MB seen on the same run): a quarter plus four
    // segments is noise; unbounded dedup records (529 bytes per message
    // before they were bounded) would add over 10 MB here.
    if store_2 > store_1 + store_1 / 4 + (2 << 20) {
        faults.push(format!(
            "the store's peak grew from {store_1} to {store_2} bytes from the first half to the \
             second ({:.0} bytes per message)",
            (store_2 - store_1) as f64 / (messages / 2) as f64
        ));
    }
    if store_2 > 8 * bound {
        faults.push(format!(
            "the store reached {store_2} bytes on disk, over 8 times the {bound} bytes of quota \
             and dedup bound"
        ));
    }
    if rss_2 > rss_1 + rss_1 / 10 {
        faults.push(format!(
            "peak RSS grew from {rss_1} to {rss_2} KiB from the first half to the second"
        ));
    }
    // Idle: nothing in flight, nothing to write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = s.dir.path().join("state");
    let mut before = Vec::new();
    mtimes(&state, &mut before);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut after = Vec::new();
    mtimes(&state, &mut after);
    let written: Vec<String> = after
        .iter()
        .filter(|f| !before.contains(*f))
        .map(|(p, _)| p.strip_prefix(&state).unwrap_or(p).display().to_string())
        .collect();
    if !written.is_empty() {
        faults.push(format!(
            "files in the state directory written while idle for 5 s: {written:?}"
        ));
    }
    assert!(faults.is_empty(), "steady traffic: {faults:#?}");
    drop(daemon);
}
