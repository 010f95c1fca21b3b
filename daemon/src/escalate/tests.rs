use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

fn config(extra: &str) -> EscalateConfig {
    toml::from_str(&format!("name = \"big\"\n{extra}")).unwrap()
}

fn escalator(extra: &str) -> Escalator {
    let config = config(extra);
    Escalator {
        permits: Semaphore::new(config.max_concurrent),
        shape: Shape {
            labels: vec!["lights_on".into(), "lights_off".into()],
            slots: None,
            label_slots: HashMap::new(),
        },
        instruction: "Classify the command.".into(),
        config,
    }
}

fn local(label: Option<&str>, p: f32) -> Scores {
    Scores {
        ranked: vec![("lights_on".into(), p), ("lights_off".into(), 1.0 - p)],
        label: label.map(str::to_owned),
        slots: None,
        inference_ms: 3.0,
        tokens: 5,
        by: slmd_engine::Stage::Model,
        unrecognised: label
            .is_none()
            .then_some(slmd_engine::Unrecognised::LowConfidence),
    }
}

/// A request the fake upstream read: its header lines and JSON body.
struct Seen {
    head: String,
    body: Value,
}

/// A one-thread HTTP server answering each request with the next of
/// `replies` (status, body, delay before answering); the requests it read
/// come back through the returned receiver.
fn upstream(replies: Vec<(u16, String, Duration)>) -> (String, std::sync::mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (status, body, delay) in replies {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut head, mut length) = (String::new(), 0);
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
            }
            let mut request = vec![0; length];
            reader.read_exact(&mut request).unwrap();
            let sent = serde_json::from_slice(&request).unwrap_or(Value::Null);
            let _ = tx.send(Seen { head, body: sent });
            std::thread::sleep(delay);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, rx)
}

fn completion(content: &str) -> String {
    json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
}

async fn resolve(e: &Escalator, local: &Scores) -> (Scores, Report) {
    let dir = tempfile::tempdir().unwrap();
    let store = slmd_store::Store::open(dir.path()).unwrap();
    let context = BTreeMap::new();
    let ask = Ask {
        correlation: "t:1".into(),
        task: "t",
        text: "lamp please",
        context: &context,
        among: None,
        local,
        received_ms: now_ms(),
    };
    let outbox = Outbox {
        store: &store,
        wake: &|| {},
    };
    e.resolve(&ask, &Pending::default(), &outbox).await
}

#[test]
fn doubtful_and_unrecognised_answers_go_upstream_templates_never() {
    let e = escalator("url = \"http://x/v1\"\nbelow = 0.7");
    assert!(e.wanted(&local(Some("lights_on"), 0.6)));
    assert!(!e.wanted(&local(Some("lights_on"), 0.8)));
    assert!(e.wanted(&local(None, 0.9)));
    let mut t = local(Some("lights_on"), 0.1);
    t.by = slmd_engine::Stage::Template;
    assert!(!e.wanted(&t));
    assert!(!escalator("url = \"http://x/v1\"\nnot_recognised = false").wanted(&local(None, 0.9)));
}

#[test]
fn a_configuration_names_one_target() {
    let problems =
        |extra: &str| -> Vec<&str> { config(extra).problems().into_iter().map(|p| p.0).collect() };
    assert!(problems("url = \"http://h/v1\"").is_empty());
    assert!(problems("topic = \"a/b\"\nreply_topic = \"a/c\"").is_empty());
    assert_eq!(problems("topic = \"a/b\""), ["reply_topic"]);
    assert_eq!(problems(""), ["url"]);
    assert_eq!(problems("url = \"ftp://h\""), ["url"]);
    assert_eq!(
        problems("url = \"http://h\"\ntopic = \"a\"\nreply_topic = \"b\""),
        ["url"]
    );
    assert_eq!(problems("topic = \"a/#\"\nreply_topic = \"b\""), ["topic"]);
}

#[tokio::test]
async fn an_http_answer_in_the_schema_is_the_result_and_the_local_guess_stays() {
    let (url, requests) = upstream(vec![(
        200,
        completion("{\"label\": \"lights_off\"}"),
        Duration::ZERO,
    )]);
    let e = escalator(&format!(
        "url = \"{url}\"\nresponse_format = \"json_object\"\nmodel = \"m\""
    ));
    let (scores, report) = resolve(&e, &local(Some("lights_on"), 0.55)).await;
    assert_eq!(scores.label.as_deref(), Some("lights_off"));
    assert_eq!(scores.by, slmd_engine::Stage::Escalated);
    assert_eq!(scores.ranked[0], ("lights_off".to_owned(), 1.0));
    assert_eq!(
        (report.outcome, report.local.label.as_deref()),
        ("answered", Some("lights_on"))
    );
    let sent = requests.recv().unwrap().body;
    assert_eq!(sent["model"], "m");
    assert_eq!(sent["messages"][1]["content"], "lamp please");
    assert_eq!(sent["response_format"]["type"], "json_object");
    assert_eq!(
        sent["response_format"]["schema"]["properties"]["label"]["enum"],
        json!(["lights_on", "lights_off", null])
    );
}

#[tokio::test]
async fn an_answer_outside_the_labels_is_refused_and_the_fallback_published() {
    let (url, _) = upstream(vec![(
        200,
        completion("{\"label\": \"unlock_door\"}"),
        Duration::ZERO,
    )]);
    let e = escalator(&format!(
        "url = \"{url}\"\non_unavailable = \"not_recognised\""
    ));
    let (scores, report) = resolve(&e, &local(Some("lights_on"), 0.55)).await;
    assert_eq!((scores.label, scores.by), (None, slmd_engine::Stage::Model));
    assert_eq!(
        scores.unrecognised,
        Some(slmd_engine::Unrecognised::UpstreamUnavailable)
    );
    assert_eq!(report.outcome, "refused");
    assert_eq!(report.reason.as_deref(), Some("unknown_label"));
    assert_eq!(report.local.label.as_deref(), Some("lights_on"));
}

#[tokio::test]
async fn server_errors_are_retried_until_the_deadline_then_the_local_answer_stands() {
    let (url, requests) = upstream(vec![
        (500, "{}".into(), Duration::ZERO),
        (503, "{}".into(), Duration::ZERO),
        (
            200,
            completion("{\"label\": \"lights_off\"}"),
            Duration::ZERO,
        ),
    ]);
    let e = escalator(&format!(
        "url = \"{url}\"\nwait_secs = 5\ntimeout_ms = 1000"
    ));
    let (scores, report) = resolve(&e, &local(Some("lights_on"), 0.55)).await;
    assert_eq!(
        (report.outcome, scores.label.as_deref()),
        ("answered", Some("lights_off"))
    );
    assert_eq!(requests.try_iter().count(), 3);

    // Without wait_secs the deadline is one timeout: one try, no retry.
    let (url, requests) = upstream(vec![(503, "{}".into(), Duration::ZERO); 10]);
    let e = escalator(&format!("url = \"{url}\"\ntimeout_ms = 300"));
    let started = std::time::Instant::now();
    let (scores, report) = resolve(&e, &local(Some("lights_on"), 0.55)).await;
    assert_eq!(
        (report.outcome, scores.label.as_deref()),
        ("unavailable", Some("lights_on"))
    );
    assert_eq!(report.reason.as_deref(), Some("http_503"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(requests.try_iter().count(), 1);
}

#[test]
fn a_request_that_takes_over_an_id_keeps_it_when_the_first_ends() {
    let pending = Pending::default();
    let first = pending.open("t:1:5");
    let second = pending.open("t:1:5");
    drop(first);
    assert!(pending.deliver(br#"{"correlation_id": "t:1:5", "label": "x"}"#));
    drop(second);
    assert!(pending.0.lock().unwrap().is_empty());
}

#[test]
fn a_clock_that_jumped_cannot_push_the_deadline_past_wait_secs() {
    let e = escalator("url = \"http://x/v1\"\nwait_secs = 10\ntimeout_ms = 1000");
    let scores = local(None, 0.1);
    let context = BTreeMap::new();
    let mut ask = Ask {
        correlation: "c".into(),
        task: "t",
        text: "x",
        context: &context,
        among: None,
        local: &scores,
        // Stored "in the future": the clock was set back since.
        received_ms: now_ms() + 3_600_000,
    };
    let left = |ask: &Ask<'_>| e.deadline(ask).saturating_duration_since(Instant::now());
    assert!(left(&ask) <= Duration::from_secs(10), "{:?}", left(&ask));
    // Arrived long ago: at least one timeout.
    ask.received_ms = now_ms() - 3_600_000;
    assert!(left(&ask) >= Duration::from_millis(900), "{:?}", left(&ask));
}

#[tokio::test]
async fn a_silent_upstream_times_out_and_a_refused_key_is_not_retried() {
    let (url, _) = upstream(vec![(
        200,
        completion("{\"label\": \"lights_off\"}"),
        Duration::from_secs(3),
    )]);
    let e = escalator(&format!("url = \"{url}\"\ntimeout_ms = 300"));
    let started = std::time::Instant::now();
    let (_, report) = resolve(&e, &local(None, 0.4)).await;
    assert_eq!(report.outcome, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let (url, requests) = upstream(vec![
        (401, "{\"error\": \"bad key\"}".into(), Duration::ZERO);
        3
    ]);
    let e = escalator(&format!("url = \"{url}\"\nwait_secs = 30"));
    let (_, report) = resolve(&e, &local(None, 0.4)).await;
    assert_eq!(report.outcome, "unavailable");
    assert_eq!(report.reason.as_deref(), Some("http_401"));
    assert_eq!(requests.try_iter().count(), 1);
}

#[tokio::test]
async fn the_bearer_token_is_read_from_its_file() {
    let (url, requests) = upstream(vec![(200, completion("{\"label\": null}"), Duration::ZERO)]);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let e = escalator(&format!(
        "url = \"{url}\"\napi_key_file = {:?}",
        key.display().to_string()
    ));
    let (scores, report) = resolve(&e, &local(Some("lights_on"), 0.3)).await;
    // The upstream says none of the labels fits: not recognised, by it.
    assert_eq!((report.outcome, scores.label), ("answered", None));
    assert_eq!(
        scores.unrecognised,
        Some(slmd_engine::Unrecognised::Upstream)
    );
    assert!(requests
        .recv()
        .unwrap()
        .head
        .contains("Authorization: Bearer s3cret\r\n"));
}

#[tokio::test]
async fn over_mqtt_the_first_valid_answer_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = slmd_store::Store::open(dir.path()).unwrap();
    let e = escalator("topic = \"up/req\"\nreply_topic = \"up/reply\"\ntimeout_ms = 5000");
    let pending = Pending::default();
    let context = BTreeMap::new();
    let local = local(Some("lights_on"), 0.4);
    let ask = Ask {
        correlation: "t:7".into(),
        task: "t",
        text: "lamp please",
        context: &context,
        among: None,
        local: &local,
        received_ms: now_ms(),
    };
    let outbox = Outbox {
        store: &store,
        wake: &|| {},
    };
    let answer = async {
        // Wait for the request to be queued, then answer: garbage, one for
        // another request, one outside the labels, then a good one.
        while pending.0.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!pending.deliver(b"not json"));
        assert!(!pending.deliver(br#"{"correlation_id": "t:8", "label": "lights_off"}"#));
        assert!(pending.deliver(br#"{"correlation_id": "t:7", "label": "open_door"}"#));
        assert!(pending.deliver(br#"{"correlation_id": "t:7", "label": "lights_off"}"#));
    };
    let ((scores, report), ()) = tokio::join!(e.resolve(&ask, &pending, &outbox), answer);
    assert_eq!(
        (report.outcome, scores.label.as_deref()),
        ("answered", Some("lights_off"))
    );
    assert!(pending.0.lock().unwrap().is_empty());
    let queued = store.outbox_pending(10, |_| false).unwrap();
    assert_eq!(queued.len(), 1);
    let (_, request) = &queued[0];
    assert_eq!(request.topic, "up/req");
    let body: Value = serde_json::from_slice(&request.payload).unwrap();
    assert_eq!(
        (
            body["correlation_id"].as_str(),
            body["reply_topic"].as_str()
        ),
        (Some("t:7"), Some("up/reply"))
    );
    assert_eq!(body["local"]["label"], "lights_on");
}
