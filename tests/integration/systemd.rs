//! The systemd notify protocol against a real datagram socket: READY after
//! the model loads, WATCHDOG pings that stop when the engine stalls, STOPPING
//! on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::util::{write_config, Broker, Client, Daemon};

/// Datagrams received until `until` matches one or `timeout` passes.
fn collect(sock: &UnixDatagram, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Whatever is queued is read even when the deadline has passed.
    loop {
        let queued = sock.recv(&mut buf);
        if queued.is_err() && Instant::now() >= deadline {
            break;
        }
        if let Ok(n) = queued {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&msg);
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

fn watchdogs(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_and_stopping() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let stall = "stall the engine now";
    let mut daemon = Daemon::start_env(
        &config,
        &broker.url(),
        &dir.path().join("slmd.log"),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            ("SLMD_FAULT_STALL_ON", stall),
        ],
    );

    // READY only after the model load, which extended the start timeout.
    let start = collect(&sock, Duration::from_secs(180), |m| m.contains("READY=1"));
    let ready = start.iter().position(|m| m.contains("READY=1"));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1: {start:?}\n{}", daemon.log_text()));
    assert!(start[..ready]
        .iter()
        .any(|m| m.contains("EXTEND_TIMEOUT_USEC=")));
    assert!(
        daemon.log_text().contains("loaded from"),
        "the model was loaded first"
    );

    // Healthy: pings at half the 1 s interval, and status lines.
    let healthy = collect(&sock, Duration::from_secs(3), |_| false);
    assert!(watchdogs(&healthy) >= 3, "{healthy:?}");
    assert!(
        healthy
            .iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("inbox 0")),
        "{healthy:?}"
    );

    // A stalled inference thread: the pings stop (systemd would restart us).
    daemon.wait_subscribed().await;
    let client = Client::connect(broker.port, &[]).await;
    client.publish("test/home/x", stall).await;
    daemon
        .wait_for_log("inference thread has not answered", Duration::from_secs(20))
        .await;
    // (A ping sent before the stall was noticed may still be queued.)
    collect(&sock, Duration::from_millis(1), |_| false);
    let stalled = collect(&sock, Duration::from_secs(3), |_| false);
    assert_eq!(watchdogs(&stalled), 0, "{stalled:?}");

    // SIGTERM: STOPPING at once.
    daemon.terminate();
    let stopping = collect(&sock, Duration::from_secs(2), |m| m.contains("STOPPING=1"));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_one_state_directory_is_refused() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut first = Daemon::start(&config, &broker.url());
    first.wait_subscribed().await;
    let mut second = Daemon::start_logged(&config, &broker.url(), &dir.path().join("2.log"));
    let code = second.exit_code(Duration::from_secs(30)).await;
    assert_ne!(code, Some(0));
    let said = second.log_text();
    assert!(said.contains("another slmd (pid "), "{said}");
    assert!(first.is_running(), "the first instance keeps serving");
}

/// `GET path` on the metrics port: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // One write, as curl sends it (the server copes with pieces too).
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Parses the Prometheus text format strictly enough to catch a malformed
/// line: every sample belongs to a family declared by `# TYPE` and has a
/// float value.
fn samples(body: &str) -> std::collections::HashMap<String, f64> {
    let mut declared = Vec::new();
    let mut out = std::collections::HashMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            declared
                .iter()
                .any(|d| name == d || name.starts_with(&format!("{d}_"))),
            "undeclared family: {line}"
        );
        out.insert(series.to_owned(), value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let port = crate::util::free_port();
    let config = write_config(
        dir.path(),
        broker.port,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut sub = Client::connect(broker.port, &["test/out/#", "test/err/#"]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;

    let (status, body) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let before = samples(&body);
    assert_eq!(before["slmd_broker_connected"], 1.0);
    assert!(before["slmd_resident_memory_bytes"] > 1e6);
    assert!(before["slmd_model_load_seconds"] > 0.0);

    for i in 0..3 {
        let msg = format!(r#"{{"id": "m-{i}", "text": "turn off the lights"}}"#);
        sub.publish("test/home/x", msg).await;
    }
    sub.publish("test/home/x", "{oops").await;
    sub.take(4, Duration::from_secs(60)).await;

    let after = samples(&http_get(port, "/metrics").1);
    let home = |name: &str| after.get(&format!("{name}{{task=\"home\"}}")).copied();
    assert_eq!(home("slmd_results_total"), Some(3.0));
    assert_eq!(home("slmd_latency_seconds_count"), Some(3.0));
    assert!(home("slmd_latency_seconds_sum").unwrap() > 0.0);
    assert_eq!(home("slmd_inference_seconds_count"), Some(3.0));
    // "turn off the lights" is several tokens, each of three times.
    assert!(home("slmd_tokens_total").unwrap() >= 9.0);
    assert_eq!(before["slmd_tokens_per_second"], 0.0);
    assert!(after["slmd_tokens_per_second"] > 0.0);
    assert_eq!(
        after.get("slmd_errors_total{task=\"home\",reason=\"invalid_json\"}"),
        Some(&1.0)
    );
    assert_eq!(after["slmd_inbox_messages"], 0.0);
    assert!(http_get(port, "/other").0.contains("404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_tasks_without_losing_messages_and_refuses_a_bad_config() {
    use nix::sys::signal::Signal;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut sub = Client::connect(
        broker.port,
        &["test/out/#", "test/err/#", "test/reloaded/#"],
    )
    .await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    let publisher = sub.client.clone();
    let send = |i: usize, topic: &'static str| {
        let payload = format!(r#"{{"id": "h-{i}", "text": "make me a coffee"}}"#);
        let client = publisher.clone();
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };

    // Messages flow while a new configuration is applied: a new output
    // topic and a new input topic.
    for i in 0..10 {
        send(i, "test/home/a").await;
    }
    let text = std::fs::read_to_string(&config).unwrap();
    let reloaded = text
        .replace(
            "output_topic = \"test/out/home\"",
            "output_topic = \"test/reloaded/home\"",
        )
        .replace(
            "topics = [\"test/home/+\"]",
            "topics = [\"test/home/+\", \"test/other/+\"]",
        );
    assert_ne!(text, reloaded);
    std::fs::write(&config, reloaded).unwrap();
    daemon.signal(Signal::SIGHUP);
    for i in 10..20 {
        send(i, "test/home/a").await;
    }
    daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(120))
        .await;
    send(20, "test/other/b").await;
    send(21, "test/home/a").await;

    let got = sub.take(22, Duration::from_secs(120)).await;
    let mut ids: Vec<String> = got.iter().map(|m| m.json()["id"].to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 22, "every message exactly once: {ids:?}");
    for m in &got {
        let id = m.json()["id"].as_str().unwrap().to_owned();
        if id == "h-20" || id == "h-21" {
            assert_eq!(m.topic, "test/reloaded/home", "{id} after the reload");
        }
    }

    // A broken file is refused; the daemon keeps serving the last good one.
    std::fs::write(&config, "this is [not toml").unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon
        .wait_for_log("keeping the running configuration", Duration::from_secs(30))
        .await;
    assert!(daemon.is_running());
    send(22, "test/other/c").await;
    let last = sub.take(1, Duration::from_secs(60)).await;
    assert_eq!(last[0].topic, "test/reloaded/home");
    assert!(sub.extra(Duration::from_secs(2)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    use nix::sys::signal::Signal;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut sub = Client::connect(broker.port, &["test/out/#", "test/err/#"]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    let n = 40;
    for i in 0..n {
        let msg = format!(r#"{{"id": "t-{i}", "text": "start the vacuum cleaner"}}"#);
        sub.publish("test/home/x", msg).await;
    }
    let mut got = sub.take(3, Duration::from_secs(60)).await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.exit_code(Duration::from_secs(30)).await, Some(0));
    let mut daemon = Daemon::start_logged(&config, &broker.url(), &dir.path().join("2.log"));
    daemon.wait_subscribed().await;
    let mut by_id = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while by_id.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} answered", by_id.len());
        got.extend(sub.next(Duration::from_secs(60)).await);
        for m in got.drain(..) {
            let id = m.json()["id"].as_str().unwrap().to_owned();
            // A republished result is byte for byte the same one.
            let first = by_id.entry(id.clone()).or_insert_with(|| m.payload.clone());
            assert_eq!(first, &m.payload, "{id} was processed twice");
        }
        assert!(daemon.is_running());
    }
    assert!(sub
        .extra(Duration::from_secs(2))
        .await
        .iter()
        .all(|m| { by_id.get(m.json()["id"].as_str().unwrap()) == Some(&m.payload) }));
}

/// A journald for the test: the running one, or one started now (and
/// stopped when the guard drops). As root, `systemd-journald` runs without
/// systemd and serves the standard sockets.
struct Journald(Option<std::process::Child>);

impl Journald {
    fn ensure() -> Journald {
        let socket = std::path::Path::new("/run/systemd/journal/socket");
        if socket.exists()
            && std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.connect(socket))
                .is_ok()
        {
            return Journald(None);
        }
        let binary = [
            "/usr/lib/systemd/systemd-journald",
            "/lib/systemd/systemd-journald",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("systemd-journald (Debian package systemd)");
        let child = std::process::Command::new(binary)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "journald did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Journald(Some(child))
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The journal's entries for process `pid` matching `filters`, as JSON.
fn journal(pid: u32, filters: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "json", &format!("_PID={pid}")])
        .args(filters)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_records_carry_structured_fields() {
    let _journald = Journald::ensure();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut sub = Client::connect(broker.port, &["test/out/#", "test/err/#"]).await;
    // systemd-cat connects stdout and stderr to the journal as a service's
    // are; JOURNAL_STREAM names that stream, as systemd sets it.
    let mut child = std::process::Command::new("systemd-cat")
        .args(["sh", "-c"])
        .arg(r#"JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" run --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_slmd"))
        .arg(&config)
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal(pid, &["SYSLOG_IDENTIFIER=slmd"]).iter().all(|e| {
        !e["MESSAGE"]
            .as_str()
            .unwrap_or("")
            .contains("subscribed to")
    }) {
        assert!(child.try_wait().unwrap().is_none(), "slmd exited");
        assert!(
            Instant::now() < deadline,
            "slmd never logged its subscription"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.publish(
        "test/home/x",
        r#"{"id": "journal-1", "text": "turn off the lights"}"#,
    )
    .await;
    sub.publish("test/home/x", "{oops").await;
    sub.take(2, Duration::from_secs(60)).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let (result, error) = loop {
        let result = journal(pid, &["TASK=home", "MSG_ID=journal-1"]);
        let error = journal(pid, &["TASK=home", "REASON=invalid_json"]);
        if !result.is_empty() && !error.is_empty() {
            break (result, error);
        }
        assert!(
            Instant::now() < deadline,
            "no structured records in the journal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let r = &result[0];
    assert_eq!(r["TOPIC"], "test/home/x");
    assert_eq!(r["SYSLOG_IDENTIFIER"], "slmd");
    assert_eq!(
        r["PRIORITY"], "5",
        "info records are notices in the journal"
    );
    assert_eq!(r["MODEL_SHA256"].as_str().unwrap().len(), 64);
    assert!(r["LATENCY_MS"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
    assert_eq!(r["LABEL"], "lights_off");
    assert!(
        r["CONFIDENCE"].as_str().unwrap().len() <= 6,
        "{}",
        r["CONFIDENCE"]
    );
    assert_eq!(error[0]["TOPIC"], "test/home/x");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}
