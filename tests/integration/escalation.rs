//! Escalation (issue 35) from outside: the real daemon and mosquitto, the
//! real model answering first, and an upstream that is a separate party:
//! an OpenAI-compatible HTTP server (a thin fake here, for what it answers
//! and when; `scripts/escalation-real.sh` runs llama-cpp-python's server)
//! or an MQTT client answering on the reply topic.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

/// What the fake upstream does with a request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers the label its `answer` function picks for the text.
    Answer,
    /// Reads the request and never answers (a wedged server).
    Hold,
}

/// An OpenAI-compatible chat completions server on loopback, one thread
/// per connection. It records the user text of every request.
struct Upstream {
    url: String,
    mode: Arc<Mutex<Mode>>,
    texts: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start(answer: fn(&str) -> Value) -> Upstream {
        Upstream::start_on(0, answer)
    }

    fn start_on(port: u16, answer: fn(&str) -> Value) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(Mode::Answer));
        let texts = Arc::new(Mutex::new(Vec::new()));
        let (m, t) = (mode.clone(), texts.clone());
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Some(body) = read_request(&conn) else {
                    continue;
                };
                let text = body["messages"][1]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                t.lock().unwrap().push(text.clone());
                if *m.lock().unwrap() == Mode::Hold {
                    held.push(conn);
                    continue;
                }
                let content = answer(&text).to_string();
                let reply =
                    json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        Upstream { url, mode, texts }
    }

    fn texts(&self) -> Vec<String> {
        self.texts.lock().unwrap().clone()
    }
}

fn read_request(conn: &TcpStream) -> Option<Value> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// The test task with `[tasks.escalate]` settings.
fn escalating(dir: &std::path::Path, port: u16, settings: &str) -> std::path::PathBuf {
    write_config(
        dir,
        port,
        &format!("[tasks.escalate]\nname = \"big-model\"\n{settings}"),
    )
}

/// Routine commands stay on the device; doubtful and out-of-scope ones go
/// to the upstream, whose answer is the result, with the local guess kept.
/// Which is which is the daemon's call: asserted for every result is that
/// it went upstream exactly when its local confidence was below `below`
/// or nothing was recognised, and that at least one of each happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubtful_commands_go_upstream_over_http_and_routine_ones_stay_local() {
    let up = Upstream::start(|text| {
        if text.contains("caffeine") {
            json!({"label": "make_coffee"})
        } else {
            json!({"label": null})
        }
    });
    let url = up.url.clone();
    let mut r = Running::with(&["test/out/#", "test/err/#"], |dir, port| {
        escalating(
            dir,
            port,
            &format!("url = \"{url}\"\nbelow = 0.5\ntimeout_ms = 5000"),
        )
    })
    .await;
    let texts = [
        "turn on the lights",
        "switch off the lights please",
        "I need caffeine badly",
        "what is the capital of france",
        "tell me a joke about penguins",
        "how tall is mount everest",
    ];
    for (i, text) in texts.iter().enumerate() {
        let body = json!({"id": format!("e{i}"), "text": text}).to_string();
        r.sub
            .client
            .publish("test/home/hall", rumqttc::QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    let results = r.sub.take(texts.len(), Duration::from_secs(60)).await;
    let (mut local, mut escalated) = (0, 0);
    for m in &results {
        assert_eq!(m.topic, "test/out/home", "{m:?}");
        let v = m.json();
        let i: usize = v["id"].as_str().unwrap()[1..].parse().unwrap();
        match v.get("escalation") {
            None => {
                local += 1;
                assert_eq!(v["by"], "model", "{v}");
                assert!(
                    v["recognised"] == true && v["confidence"].as_f64().unwrap() >= 0.5,
                    "{v}"
                );
            }
            Some(e) => {
                escalated += 1;
                let guess = &e["local"];
                assert!(
                    guess["label"].is_null() || guess["confidence"].as_f64().unwrap() < 0.5,
                    "escalated though confident: {v}"
                );
                assert_eq!(
                    (&e["upstream"], &e["outcome"]),
                    (&json!("big-model"), &json!("answered")),
                    "{v}"
                );
                assert_eq!(v["by"], "escalated", "{v}");
                let want = if texts[i].contains("caffeine") {
                    json!("make_coffee")
                } else {
                    Value::Null
                };
                assert_eq!(v["label"], want, "{v}");
                if want.is_null() {
                    assert_eq!(v["not_recognised"], "upstream", "{v}");
                }
                assert!(up.texts().iter().any(|t| t == texts[i]), "{v}");
            }
        }
    }
    assert!(
        local >= 1 && escalated >= 1,
        "local {local}, escalated {escalated}: {results:?}"
    );
    assert_eq!(
        up.texts().len(),
        escalated,
        "one request per escalated message"
    );
    let log = r.daemon.log_text();
    assert!(log.contains("escalated: answered"), "{log}");
}

/// Killed while an escalation is pending, the daemon asks again on restart
/// and publishes one result; the message is not blamed for the crash (the
/// model had finished with it), so it cannot end as a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_pending_across_a_kill_is_answered_once_and_blames_nobody() {
    let up = Upstream::start(|_| json!({"label": "vacuum"}));
    *up.mode.lock().unwrap() = Mode::Hold;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // Every answer escalates (below 1); max_attempts 1: one blame would
    // dead-letter it.
    let config = escalating(
        dir.path(),
        broker.port,
        &format!(
            "url = \"{}\"\nbelow = 1.0\ntimeout_ms = 20000\nwait_secs = 120",
            up.url
        ),
    );
    edit(
        &config,
        "[limits]",
        "[limits]\nmax_attempts = 1\ndead_letter_topic = \"test/out/dead\"",
    );
    let mut sub = Client::connect(broker.port, &["test/out/#", "test/err/#"]).await;
    let log = dir.path().join("first.log");
    let mut daemon = Daemon::start_logged(&config, &broker.url(), &log);
    daemon.wait_subscribed().await;
    sub.publish(
        "test/home/hall",
        json!({"id": "p1", "text": "hoover the living room"}).to_string(),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while up.texts().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no escalation arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill();
    assert!(sub.extra(Duration::from_millis(300)).await.is_empty());
    *up.mode.lock().unwrap() = Mode::Answer;
    let log = dir.path().join("second.log");
    let mut daemon = Daemon::start_logged(&config, &broker.url(), &log);
    daemon.wait_subscribed().await;
    let got = sub.take(1, Duration::from_secs(60)).await;
    let v = got[0].json();
    assert_eq!(got[0].topic, "test/out/home", "{v}");
    assert_eq!(
        (&v["id"], &v["label"], &v["by"]),
        (&json!("p1"), &json!("vacuum"), &json!("escalated")),
        "{v}"
    );
    assert!(
        sub.extra(Duration::from_secs(2)).await.is_empty(),
        "more than one result"
    );
    assert_eq!(
        up.texts(),
        ["hoover the living room", "hoover the living room"]
    );
    let text = daemon.log_text();
    assert!(
        text.contains("did not stop cleanly: 0 message(s)"),
        "{text}"
    );
    daemon.terminate();
}

/// Over MQTT: the request goes out through the outbox with the labels,
/// the schema and the local guess; answers that do not parse, belong to
/// another request or name a label the task lacks are refused, and the
/// first valid one is the result. A Hermes-free plain task here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_the_first_valid_answer_is_the_result() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = escalating(
        dir.path(),
        broker.port,
        "topic = \"up/request\"\nreply_topic = \"up/reply\"\nbelow = 1.0\ntimeout_ms = 30000",
    );
    let mut upstream = Client::connect(broker.port, &["up/request"]).await;
    let mut sub = Client::connect(broker.port, &["test/out/#", "test/err/#"]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    sub.publish(
        "test/home/hall",
        json!({"id": "m1", "text": "dim the lights a bit"}).to_string(),
    )
    .await;
    let request = upstream.take(1, Duration::from_secs(60)).await[0].json();
    assert_eq!(request["text"], "dim the lights a bit");
    assert_eq!(request["reply_topic"], "up/reply");
    assert_eq!(request["labels"].as_array().unwrap().len(), LABELS.len());
    assert!(request["local"]["confidence"].as_f64().unwrap() < 1.0);
    assert_eq!(request["schema"]["required"], json!(["label"]));
    let id = request["correlation_id"].as_str().unwrap().to_owned();
    for answer in [
        "not json at all".to_owned(),
        json!({"correlation_id": "home:other", "label": "vacuum"}).to_string(),
        json!({"correlation_id": id, "label": "unlock_front_door"}).to_string(),
        json!({"correlation_id": id, "label": "lights_dim"}).to_string(),
        json!({"correlation_id": id, "label": "vacuum"}).to_string(),
    ] {
        upstream.publish("up/reply", answer).await;
    }
    let got = sub.take(1, Duration::from_secs(30)).await;
    let v = got[0].json();
    assert_eq!(
        (&v["label"], &v["by"]),
        (&json!("lights_dim"), &json!("escalated")),
        "{v}"
    );
    assert_eq!(v["escalation"]["outcome"], "answered");
    assert!(sub.extra(Duration::from_secs(2)).await.is_empty());
    let log = daemon.log_text();
    assert!(
        log.contains("unlock_front_door\" is not one of the task's labels"),
        "{log}"
    );
    daemon.terminate();
}

/// An upstream that is down: after its deadline the task's fallback is
/// published (here: not recognised), the local guess in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_the_fallback_in_time() {
    let closed = format!("http://127.0.0.1:{}/v1", free_port());
    let mut r = Running::with(&["test/out/#", "test/err/#"], |dir, port| {
        escalating(
            dir,
            port,
            &format!("url = \"{closed}\"\nbelow = 1.0\ntimeout_ms = 500\nwait_secs = 2\non_unavailable = \"not_recognised\""),
        )
    })
    .await;
    let started = std::time::Instant::now();
    r.sub
        .publish(
            "test/home/hall",
            json!({"id": "u1", "text": "turn on the lights"}).to_string(),
        )
        .await;
    let v = r.sub.take(1, Duration::from_secs(30)).await[0].json();
    let took = started.elapsed();
    assert_eq!(
        (&v["recognised"], &v["by"]),
        (&json!(false), &json!("model")),
        "{v}"
    );
    let e = &v["escalation"];
    assert_eq!(
        (&e["outcome"], &e["reason"]),
        (&json!("unavailable"), &json!("unreachable")),
        "{v}"
    );
    // No URL (nor anything else the upstream said) in what is published.
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    // The fallback's reason, or the device's own when it recognised
    // nothing itself; the local guess is kept either way.
    let why = v["not_recognised"].as_str().unwrap_or("none");
    match e["local"]["label"].as_str() {
        Some(guess) => {
            assert!(LABELS.contains(&guess), "{v}");
            assert_eq!(why, "upstream_unavailable", "{v}");
        }
        None => assert!(["low_confidence", "unlike_examples"].contains(&why), "{v}"),
    }
    assert!(e["local"]["confidence"].as_f64().unwrap() > 0.0, "{v}");
    // Tried until the deadline (2 s after arrival), not much longer.
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

/// An upstream that is down when the message arrives and back within
/// `wait_secs` answers it: the daemon keeps trying until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_back_within_wait_secs_answers() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let mut r = Running::with(&["test/out/#", "test/err/#"], |dir, p| {
        escalating(
            dir,
            p,
            &format!("url = \"{url}\"\nbelow = 1.0\ntimeout_ms = 2000\nwait_secs = 20"),
        )
    })
    .await;
    r.sub
        .publish(
            "test/home/hall",
            json!({"id": "b1", "text": "start the robot hoover"}).to_string(),
        )
        .await;
    // Down for 3 s (connections refused), then up on the same port.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(r.sub.extra(Duration::ZERO).await.is_empty());
    let up = Upstream::start_on(port, |_| json!({"label": "vacuum"}));
    let v = r.sub.take(1, Duration::from_secs(30)).await[0].json();
    assert_eq!(
        (&v["label"], &v["by"], &v["escalation"]["outcome"]),
        (&json!("vacuum"), &json!("escalated"), &json!("answered")),
        "{v}"
    );
    assert_eq!(up.texts(), ["start the robot hoover"]);
}
