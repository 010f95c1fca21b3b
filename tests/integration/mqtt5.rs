//! MQTT 5 request/response and TLS, against mosquitto and the real model.

use std::time::Duration;

use crate::util::{make_certs, write_config, Broker, Client, Daemon, Running, V5Client, LABELS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_gets_the_result_with_its_correlation_data() {
    // No response topic is allowed by default (security.rs).
    let mut run = Running::with(&["test/out/#", "test/err/#"], |dir, port| {
        let config = write_config(dir, port, "");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "[limits]\n",
            "[limits]\nresponse_topics = [\"app/replies/#\", \"test/home/#\"]\n",
        );
        std::fs::write(&config, text).unwrap();
        config
    })
    .await;
    let port = run.broker.port;
    let mut app = V5Client::connect(port, &["app/replies/#"]).await;
    let t = Duration::from_secs(60);

    // A request naming a response topic: the result goes there, with the
    // correlation data, and not to the task's output topic.
    let request = r#"{"id": "r-1", "text": "turn off the lights"}"#;
    app.request("test/home/hall", request, "app/replies/a", b"corr-\x00\xff")
        .await;
    let got = app.next(t).await.expect("a result on the response topic");
    assert_eq!(got.topic, "app/replies/a");
    assert_eq!(got.correlation.as_deref(), Some(&b"corr-\x00\xff"[..]));
    let v = got.json();
    assert_eq!(v["id"], "r-1");
    assert!(LABELS.contains(&v["label"].as_str().unwrap()), "{v}");

    // Its error result goes there too.
    app.request("test/home/hall", "{not json", "app/replies/b", b"corr-2")
        .await;
    let got = app.next(t).await.expect("an error on the response topic");
    assert_eq!(got.topic, "app/replies/b");
    assert_eq!(got.correlation.as_deref(), Some(&b"corr-2"[..]));
    assert_eq!(got.json()["error"]["reason"], "invalid_json");

    // A redelivery of r-1 gets the stored answer, on the original response
    // topic with the original correlation data.
    app.request("test/home/hall", request, "app/replies/a", b"corr-\x00\xff")
        .await;
    let again = app.next(t).await.expect("the stored result again");
    assert_eq!(again.topic, "app/replies/a");
    assert_eq!(again.json()["label"], v["label"]);

    // A response topic that is one of slmd's own inputs would loop: refused,
    // reported on the task's error topic.
    app.request(
        "test/home/hall",
        r#"{"id": "r-3", "text": "make me a coffee"}"#,
        "test/home/loop",
        b"c3",
    )
    .await;
    let err = run.sub.next(t).await.expect("an error result").json();
    assert_eq!(err["id"], "r-3");
    assert_eq!(err["error"]["reason"], "response_topic_refused");

    // Nothing reached the output topic, and nothing more came.
    assert!(run.sub.extra(Duration::from_secs(2)).await.is_empty());
    assert!(app.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let (plain, tls_port) = (crate::util::free_port(), crate::util::free_port());
    let dir = Broker::dir();
    make_certs(dir.path());
    let certs = dir.path().to_path_buf();
    let listener = format!(
        "listener {tls_port} 127.0.0.1\ncafile {c}/ca.crt\ncertfile {c}/server.crt\n\
         keyfile {c}/server.key\nrequire_certificate true\n",
        c = certs.display()
    );
    let _broker = Broker::start_in(dir, plain, &listener);
    crate::util::wait_for_port(tls_port, Duration::from_secs(10));

    let work = tempfile::tempdir().unwrap();
    let tls = format!(
        "[broker.tls]\nca_file = \"{c}/ca.crt\"\nclient_cert = \"{c}/client.crt\"\n\
         client_key = \"{c}/client.key\"\n",
        c = certs.display()
    );
    let config = write_config(work.path(), tls_port, &tls);
    let mut sub = Client::connect(plain, &["test/out/#"]).await;
    let mut daemon = Daemon::start(&config, &format!("mqtt://127.0.0.1:{tls_port}"));
    daemon.wait_subscribed().await;
    sub.publish(
        "test/home/x",
        r#"{"id": "tls-1", "text": "start the vacuum cleaner"}"#,
    )
    .await;
    let v = sub.take(1, Duration::from_secs(60)).await[0].json();
    assert_eq!(v["id"], "tls-1");
    assert!(daemon.log_text().contains("connected to broker"));

    // Without the client certificate the broker refuses the handshake: the
    // daemon says why and keeps retrying, it does not exit.
    let work2 = tempfile::tempdir().unwrap();
    let config = write_config(
        work2.path(),
        tls_port,
        &format!("[broker.tls]\nca_file = \"{}/ca.crt\"\n", certs.display()),
    );
    let mut refused = Daemon::start(&config, &format!("mqtt://127.0.0.1:{tls_port}"));
    refused
        .wait_for_log("retrying in", Duration::from_secs(120))
        .await;
    assert!(refused.is_running());
    assert!(!refused.log_text().contains("subscribed to"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_retained_and_the_last_will_reports_offline() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    // A consumer arriving later still learns the state: it is retained.
    let mut watcher = Client::connect(broker.port, &["slmd/+/status"]).await;
    let t = Duration::from_secs(10);
    let online = watcher.next(t).await.expect("retained presence");
    assert!(
        online.topic.starts_with("slmd/slmd-test-"),
        "{}",
        online.topic
    );
    assert_eq!(online.json()["state"], "online");
    // Power cut: the broker publishes the Last Will.
    daemon.kill();
    let offline = watcher.next(t).await.expect("the last will");
    assert_eq!(offline.topic, online.topic);
    assert_eq!(offline.json()["state"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_are_sent_and_a_wrong_one_is_refused() {
    let dir = Broker::dir();
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["slmd", "s3cret"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(made.success());
    let perms = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(&passwords, perms).unwrap();
    // A second listener that requires a password; the first stays open for
    // the test client.
    let (open, locked) = (crate::util::free_port(), crate::util::free_port());
    let conf = format!(
        "per_listener_settings true\nlistener {locked} 127.0.0.1\npassword_file {}\n\
         allow_anonymous false\n",
        passwords.display()
    );
    let _broker = Broker::start_in(dir, open, &conf);
    crate::util::wait_for_port(locked, Duration::from_secs(10));

    let work = tempfile::tempdir().unwrap();
    let mut sub = Client::connect(open, &["test/out/#"]).await;
    let url = format!("mqtt://127.0.0.1:{locked}");
    let good = login_config(work.path(), locked, "s3cret");
    let mut daemon = Daemon::start(&good, &url);
    daemon.wait_subscribed().await;
    sub.publish(
        "test/home/x",
        r#"{"id": "pw-1", "text": "make me a coffee"}"#,
    )
    .await;
    assert_eq!(
        sub.take(1, Duration::from_secs(60)).await[0].json()["id"],
        "pw-1"
    );

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = login_config(wrong_dir.path(), locked, "wrong");
    let mut refused = Daemon::start(&wrong, &url);
    refused
        .wait_for_log("retrying in", Duration::from_secs(120))
        .await;
    assert!(!refused.log_text().contains("subscribed to"));
}

/// The test config, logging in as user slmd with `password`.
fn login_config(dir: &std::path::Path, port: u16, password: &str) -> std::path::PathBuf {
    let config = write_config(dir, port, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "keep_alive_secs = 30\n",
        &format!("keep_alive_secs = 30\nusername = \"slmd\"\npassword = \"{password}\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// A broker that grants at most QoS 0 (mosquitto `max_qos 0`): slmd
/// connects once with a will it takes, answers QoS 0 input at QoS 0, and
/// does not reconnect in a loop. Input and output through mosquitto's own
/// clients, as a user would check it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_grants_only_qos_0_is_served_at_qos_0_on_one_connection() {
    use std::process::{Command, Stdio};
    // max_qos is a listener setting: a second listener has it.
    let (plain, port) = (crate::util::free_port(), crate::util::free_port());
    let listener = format!("listener {port} 127.0.0.1\nmax_qos 0\n");
    let _broker = Broker::start_in(Broker::dir(), plain, &listener);
    crate::util::wait_for_port(port, Duration::from_secs(10));
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), port, "");
    let mut daemon = Daemon::start(&config, &format!("mqtt://127.0.0.1:{port}"));
    daemon.wait_subscribed().await;
    let sub = Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-V",
            "5",
            "-q",
            "0",
            "-C",
            "1",
            "-W",
            "60",
        ])
        .args(["-t", "test/out/home"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-V", "5", "-q", "0"])
        .args([
            "-t",
            "test/home/hall",
            "-m",
            r#"{"id": "q0-1", "text": "turn off the lights"}"#,
        ])
        .status()
        .unwrap();
    assert!(published.success());
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON result");
    assert_eq!(v["id"], "q0-1");
    assert!(LABELS.contains(&v["label"].as_str().unwrap()), "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = daemon.log_text();
    assert_eq!(log.matches("connected to broker").count(), 1, "{log}");
    assert!(log.contains("grants maximum QoS AtMostOnce"), "{log}");
    assert!(log.contains("does not take QoS 1"), "{log}");
}
