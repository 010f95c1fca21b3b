//! The router with a stand-in engine ([`Engine::from_fn`]) and a real
//! store in a temporary directory: no broker, no model.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use super::*;
use crate::bundle::control::Sequence;
use crate::bundle::transfer::Transfers;
use crate::config::Config;
use slmd_engine::{ModelInfo, Scores};

struct Rig {
    router: Arc<Router>,
    /// How many queries reached the engine.
    calls: Arc<AtomicUsize>,
    shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// A router over one JSON task `f` (labels a and b) on `f/+/in`; the engine
/// answers "a" to every text except `fail` (a decode error) and `long`
/// (too long). `task` adds lines to the task; `tune` changes the config.
/// The router starts with [`Rig::run`].
fn rig(task: &str, tune: impl FnOnce(&mut Config)) -> Rig {
    let mut config = crate::config::tests::config(&format!("kind = \"classify\"\n{task}"));
    config.tasks[0].topics = vec!["f/+/in".into()];
    config.tasks[0].output_topic = "f/out".into();
    config.limits.response_topics = vec!["reply/#".into()];
    tune(&mut config);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let model = ModelInfo {
        name: "stand-in".into(),
        sha256: "1".repeat(64),
        version: None,
    };
    let engine = Engine::from_fn(vec!["f".into()], model, move |_, q| {
        counted.fetch_add(1, Ordering::SeqCst);
        match q.text.as_str() {
            "fail" => Err(EngineError::Decode("stand-in failure".into())),
            "long" => Err(EngineError::TooLong {
                tokens: 900,
                limit: 512,
            }),
            _ => Ok(Scores {
                ranked: vec![("a".into(), 0.9), ("b".into(), 0.1)],
                label: Some("a".into()),
                slots: None,
                inference_ms: 1.0,
                tokens: 3,
                by: slmd_engine::Stage::Model,
                unrecognised: None,
            }),
        }
    });
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let control = Control {
        topic: "slmd/t/model/update".into(),
        status_topic: "slmd/t/model/status".into(),
        trust: Default::default(),
        require_signed: true,
        require_signed_injection: true,
        device: "t".into(),
        sequence: Sequence::open(dir.path()).unwrap(),
        transfers: Arc::new(Transfers::open(dir.path(), config.updates.transfer_bounds()).unwrap()),
        reserved: vec!["slmd/t/#".into()],
        tx,
    };
    let routing = Routing::new(engine, config.tasks.clone(), config.limits.clone());
    let router = Arc::new(Router::new(
        store,
        routing,
        control,
        Arc::new(Notify::new()),
        Arc::new(|| {}),
        Arc::new(Metrics::new(0.0)),
    ));
    let (shutdown, _) = watch::channel(false);
    Rig {
        router,
        calls,
        shutdown,
        _dir: dir,
    }
}

fn message(topic: &str, payload: &str) -> InboxEntry {
    InboxEntry {
        received_ms: now_ms(),
        dup: false,
        reply: None,
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        truncated: None,
    }
}

impl Rig {
    /// Starts the router on the store as it is.
    fn run(self) -> Rig {
        let shutdown = self.shutdown.subscribe();
        tokio::spawn(self.router.clone().run(shutdown, Duration::from_secs(1)));
        self
    }

    fn send(&self, entry: InboxEntry) -> u64 {
        let key = self.router.store.append_inbox(&entry).unwrap();
        self.router.inbox_wake.notify_one();
        key
    }

    /// Waits until the inbox is empty, then returns the outbox as
    /// (topic, correlation, JSON payload) in commit order.
    async fn settled(&self) -> Vec<(String, Option<Vec<u8>>, Value)> {
        let store = &self.router.store;
        for _ in 0..500 {
            if store.inbox_after(None, 1).unwrap().is_empty() {
                let out = store.outbox_pending(1000, |_| false).unwrap();
                return out
                    .into_iter()
                    .map(|(_, e)| {
                        let v = serde_json::from_slice(&e.payload).unwrap();
                        (e.topic, e.correlation, v)
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the router left messages in the inbox");
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[tokio::test]
async fn a_message_is_inferred_once_and_its_result_committed() {
    let rig = rig("", |_| {}).run();
    rig.send(message("f/1/in", r#"{"id": "m1", "text": "turn it on"}"#));
    let out = rig.settled().await;
    assert_eq!(out.len(), 1, "{out:?}");
    let (topic, _, result) = &out[0];
    assert_eq!(topic, "f/out");
    assert_eq!(result["id"], "m1");
    assert_eq!(result["label"], "a");
    assert_eq!(result["model"]["name"], "stand-in");
    assert_eq!(rig.calls(), 1);
}

#[tokio::test]
async fn a_redelivered_id_is_answered_from_the_store_without_inference() {
    let rig = rig("", |_| {}).run();
    rig.send(message("f/1/in", r#"{"id": "m1", "text": "turn it on"}"#));
    rig.settled().await;
    let mut again = message("f/1/in", r#"{"id": "m1", "text": "turn it on"}"#);
    again.dup = true;
    rig.send(again);
    let out = rig.settled().await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].2, out[1].2, "the stored result, byte for byte");
    assert_eq!(rig.calls(), 1);
}

#[tokio::test]
async fn the_same_text_to_two_response_topics_is_two_requests() {
    let rig = rig("", |_| {}).run();
    for (to, corr) in [("reply/a", b"1"), ("reply/b", b"2")] {
        let mut m = message("f/1/in", "turn it on");
        m.reply = Some(Reply {
            topic: to.into(),
            correlation: Some(corr.to_vec()),
        });
        rig.send(m);
    }
    let out = rig.settled().await;
    let mut to: Vec<_> = out.iter().map(|(t, c, _)| (t.clone(), c.clone())).collect();
    to.sort();
    assert_eq!(
        to,
        vec![
            ("reply/a".to_string(), Some(b"1".to_vec())),
            ("reply/b".to_string(), Some(b"2".to_vec()))
        ]
    );
    assert_eq!(rig.calls(), 2);
}

#[tokio::test]
async fn a_response_topic_outside_the_allowed_ones_is_refused_without_inference() {
    let rig = rig("", |_| {}).run();
    for to in ["elsewhere/x", "slmd/t/model/update", "f/2/in"] {
        let mut m = message("f/1/in", &format!(r#"{{"id": "{to}", "text": "on"}}"#));
        m.reply = Some(Reply {
            topic: to.into(),
            correlation: None,
        });
        rig.send(m);
    }
    let out = rig.settled().await;
    assert_eq!(out.len(), 3, "{out:?}");
    for (topic, _, body) in &out {
        assert_eq!(topic, "f/out/error");
        assert_eq!(body["error"]["reason"], "response_topic_refused", "{body}");
    }
    assert_eq!(rig.calls(), 0);
}

#[tokio::test]
async fn engine_failures_become_error_results_and_bad_input_never_reaches_it() {
    let rig = rig("", |_| {}).run();
    rig.send(message("f/1/in", r#"{"id": "e1", "text": "fail"}"#));
    rig.send(message("f/1/in", r#"{"id": "e2", "text": "long"}"#));
    rig.send(message("f/1/in", r#"{"id": "e3", "text": ""}"#));
    rig.send(message("f/1/in", r#"{"id": "e4""#));
    let out = rig.settled().await;
    let reasons: Vec<_> = out
        .iter()
        .map(|(t, _, b)| (t.as_str(), b["error"]["reason"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("f/out/error", "inference_failed"),
            ("f/out/error", "text_too_long"),
            ("f/out/error", "empty_text"),
            ("f/out/error", "invalid_json"),
        ]
    );
    assert_eq!(rig.calls(), 2);
}

#[tokio::test]
async fn a_message_blamed_for_crashes_is_a_dead_letter_and_never_runs() {
    let rig = rig("", |c| c.limits.max_attempts = 1);
    // Dispatched, then the process "died": the store blames it once
    // before the router starts.
    let store = &rig.router.store;
    let key = store
        .append_inbox(&message("f/1/in", r#"{"id": "d1", "text": "crash"}"#))
        .unwrap();
    store.mark_dispatched(&[key]).unwrap();
    assert_eq!(store.blame_dispatched().await.unwrap(), 1);
    let rig = rig.run();
    let out = rig.settled().await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, "slmd/dead-letter");
    let dead = &out[0].2;
    assert_eq!(dead["error"]["reason"], "too_many_attempts", "{dead}");
    assert_eq!((&dead["id"], &dead["attempts"]), (&"d1".into(), &1.into()));
    assert_eq!(dead["payload"], r#"{"id": "d1", "text": "crash"}"#);
    assert_eq!(rig.calls(), 0);
}

#[tokio::test]
async fn unconsumed_topics_are_dropped_and_unsigned_control_requests_refused() {
    let rig = rig("", |_| {}).run();
    rig.send(message("nobody/reads/this", "hello"));
    rig.send(message(
        "slmd/t/model/update",
        r#"{"source": "/tmp/b.slmdb", "activate": true}"#,
    ));
    let out = rig.settled().await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, "slmd/t/model/status");
    assert_eq!(out[0].2["state"], "refused", "{:?}", out[0].2);
    assert_eq!(rig.calls(), 0);
}

#[tokio::test]
async fn a_policy_sees_the_latest_vehicle_state_and_bad_states_are_errors() {
    let policy = r#"
        [tasks.policy]
        state_topic = "car/state"
        default = "execute"
        [[tasks.policy.rules]]
        intent = "a"
        confirm_above_kmh = 10
    "#;
    let rig = rig(policy, |_| {}).run();
    rig.send(message("car/state", r#"{"speed_kmh": 50}"#));
    rig.send(message("car/state", r#"{"speed_kmh": "fast"}"#));
    rig.send(message(
        "f/1/in",
        r#"{"id": "p1", "text": "open the window"}"#,
    ));
    let out = rig.settled().await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].0, "f/out/error");
    assert_eq!(out[0].2["error"]["reason"], "bad_state");
    assert_eq!(out[1].2["action"]["decision"], "confirm", "{:?}", out[1].2);
    rig.send(message("car/state", r#"{"speed_kmh": 0}"#));
    rig.send(message(
        "f/1/in",
        r#"{"id": "p2", "text": "open the window"}"#,
    ));
    let out = rig.settled().await;
    assert_eq!(out[2].2["action"]["decision"], "execute", "{:?}", out[2].2);
}
