//! The control plane against a client of the broker that means harm
//! (docs/SECURITY.md): each test replays one attack that worked on the
//! old defaults, against the real daemon and mosquitto.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::updates::{bundle, client_id, keys, serving_model, signed, status_until, Keys};
use crate::util::{write_config, Broker, Client, Daemon, V5Client};

/// `[updates]` trusting `k`, with the security keys at their defaults and
/// `extra` added. The canary's latency gate is not under test.
fn updates(k: &Keys, extra: &str) -> String {
    format!(
        "\n[updates]\ntrusted_keys = [\"{}\"]\ntrial_secs = 2\ncanary_max_p95_ms = 60000\n{extra}\n",
        k.public
    )
}

struct Rig {
    _broker: Broker,
    daemon: Daemon,
    sub: Client,
    dir: tempfile::TempDir,
    k: Keys,
    id: String,
    control: String,
    status: String,
}

async fn rig(extra: &str) -> Rig {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let extra = extra.replace("{dir}", &dir.path().display().to_string());
    let config = write_config(dir.path(), broker.port, &updates(&k, &extra));
    let id = client_id(&config);
    let control = format!("slmd/{id}/model/update");
    let status = format!("slmd/{id}/model/status");
    let sub = Client::connect(broker.port, &["test/out/#", "test/err/#", &status]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    Rig {
        _broker: broker,
        daemon,
        sub,
        dir,
        k,
        id,
        control,
        status,
    }
}

impl Rig {
    async fn send(&self, payload: String) {
        self.sub.publish(&self.control, payload).await;
    }

    /// The control handler's own refusal (before any install starts).
    async fn refused_now(&mut self) -> Value {
        status_until(&mut self.sub, &self.status, |s| s["state"] == "refused").await
    }

    /// An install that ran and was refused; its recorded reason.
    async fn refused_install(&mut self) -> String {
        let s = status_until(&mut self.sub, &self.status, |s| {
            s["state"] == "idle" && s["last"]["outcome"] == "refused"
        })
        .await;
        s["last"]["reason"].as_str().unwrap().to_owned()
    }

    async fn serving(&mut self, version: &str) -> Value {
        status_until(&mut self.sub, &self.status, |s| {
            s["state"] == "idle" && s["serving"]["version"] == version
        })
        .await
    }

    fn state(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join("state").join(rel)
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Attack 1: `{"source": older, "force": true}` from any client of the
/// broker activated an older version. Now control requests must be
/// signed by default, `force` needs a signed request naming this device
/// with a fresh sequence number, and the version rule holds otherwise; a
/// replayed forced request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_broker_cannot_downgrade_the_model_nor_replay_a_forced_request() {
    let mut r = rig("source_dir = \"{dir}\"").await;
    let d = r.dir.path().to_path_buf();
    let new = bundle(&d, "2.0.0", Some(&r.k));
    let old = bundle(&d, "1.0.0", Some(&r.k));
    r.send(signed(&r.k, &json!({"source": new}))).await;
    r.serving("2.0.0").await;

    // The attack as it was: unsigned, forced.
    let attack = json!({"source": old, "activate": true, "force": true});
    r.send(attack.to_string()).await;
    assert_eq!(r.refused_now().await["reason"], "unsigned");
    // Signed, but replayable (no sequence number, no device): refused.
    r.send(signed(&r.k, &attack)).await;
    let s = r.refused_now().await;
    assert_eq!(s["reason"], "not_allowed", "{s}");
    // Signed without force: the command line's version rule.
    r.send(signed(&r.k, &json!({"source": old}))).await;
    assert!(r.refused_install().await.starts_with("downgrade"));
    assert_eq!(
        serving_model(&mut r.sub, "still-2").await["version"],
        "2.0.0"
    );

    // The owner's forced downgrade, for this device, sequence 7: honoured.
    let forced = signed(
        &r.k,
        &json!({"source": old, "force": true, "seq": 7, "device": r.id}),
    );
    r.send(forced.clone()).await;
    r.serving("1.0.0").await;
    r.send(signed(&r.k, &json!({"source": new, "seq": 8})))
        .await;
    r.serving("2.0.0").await;
    // Someone who saw the forced request sends it again: refused.
    r.send(forced).await;
    let s = r.refused_now().await;
    assert_eq!(s["reason"], "replayed", "{s}");
    assert_eq!(
        serving_model(&mut r.sub, "after-replay").await["version"],
        "2.0.0"
    );
    // The highest sequence number survives a restart.
    assert_eq!(
        std::fs::read_to_string(r.state("bundles/control-seq")).unwrap(),
        "8"
    );
    assert!(r.daemon.is_running());
}

/// An HTTP server on loopback that records every path asked for:
/// `/bundles/big` streams 64 MiB with no Content-Length, `/bundles/moved`
/// redirects to `/internal-admin`, anything else answers "ok".
fn hostile_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = first.split(' ').nth(1).unwrap_or("").to_owned();
            seen.lock().unwrap().push(path.clone());
            if path == "/bundles/big" {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                let block = vec![0u8; 64 << 10];
                for _ in 0..1024 {
                    if conn.write_all(&block).is_err() {
                        break;
                    }
                }
            } else if path == "/bundles/moved" {
                let head = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/internal-admin?x=2\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(head.as_bytes());
            } else {
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        }
    });
    (port, hits)
}

/// Attack 2: a request made slmd GET any URL, downloaded a 300 MB body
/// whole and left it in staging. Now URLs must start with a configured
/// prefix (none by default), redirects are not followed, local paths must
/// lie under `source_dir`, downloads stop at the declared size or
/// `max_bundle_bytes`, and staging is empty after every failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cannot_make_slmd_fetch_any_url_or_fill_staging() {
    let (port, hits) = hostile_server();
    let mut r = rig(&format!(
        "url_prefixes = [\"http://127.0.0.1:{port}/bundles/\"]\n\
         source_dir = \"{{dir}}/incoming\"\nmax_bundle_bytes = 4194304"
    ))
    .await;
    std::fs::create_dir_all(r.dir.path().join("incoming")).unwrap();
    let admin = format!("http://127.0.0.1:{port}/internal-admin?x=1");
    // The attack as it was (unsigned), then signed: no request is sent.
    r.send(json!({"source": admin}).to_string()).await;
    assert_eq!(r.refused_now().await["reason"], "unsigned");
    r.send(signed(&r.k, &json!({"source": admin}))).await;
    assert!(r.refused_install().await.starts_with("not_allowed"));
    let tricks = [
        format!("http://127.0.0.1:{port}/bundles/../internal-admin"),
        format!("http://127.0.0.1:{port}@127.0.0.2:{port}/bundles/x"),
    ];
    for t in &tricks {
        r.send(signed(&r.k, &json!({"source": t}))).await;
        let why = r.refused_install().await;
        assert!(why.starts_with("not_allowed"), "{t}: {why}");
    }
    assert!(
        hits.lock().unwrap().is_empty(),
        "{:?}",
        hits.lock().unwrap()
    );

    // A redirect from an allowed prefix is not followed.
    r.send(signed(
        &r.k,
        &json!({"source": format!("http://127.0.0.1:{port}/bundles/moved")}),
    ))
    .await;
    assert!(r.refused_install().await.starts_with("download_failed"));
    assert_eq!(*hits.lock().unwrap(), vec!["/bundles/moved".to_owned()]);

    // An endless body stops at max_bundle_bytes, or at the declared size.
    let big = format!("http://127.0.0.1:{port}/bundles/big");
    r.send(signed(&r.k, &json!({"source": big}))).await;
    let why = r.refused_install().await;
    assert!(
        why.starts_with("too_large") && why.contains("4194304"),
        "{why}"
    );
    r.send(signed(&r.k, &json!({"source": big, "size": 100000})))
        .await;
    let why = r.refused_install().await;
    assert!(
        why.starts_with("too_large") && why.contains("100000"),
        "{why}"
    );
    assert_eq!(files_in(&r.state("bundles/.staging")), Vec::<String>::new());

    // Local paths: only under source_dir, also through a symlink.
    let outside = bundle(r.dir.path(), "2.0.0", Some(&r.k));
    std::os::unix::fs::symlink(&outside, r.dir.path().join("incoming/link.slmdb")).unwrap();
    for p in [
        outside.display().to_string(),
        format!("{}/incoming/link.slmdb", r.dir.path().display()),
        format!("{}/incoming/../smol-2.0.0.slmdb", r.dir.path().display()),
    ] {
        r.send(signed(&r.k, &json!({"source": p}))).await;
        let why = r.refused_install().await;
        assert!(why.starts_with("not_allowed"), "{p}: {why}");
    }
    assert_eq!(files_in(&r.state("bundles/.staging")), Vec::<String>::new());
    assert_eq!(
        serving_model(&mut r.sub, "still-serving").await["version"],
        Value::Null
    );
}

fn transfer(id: &str, size: u64, sha: &str) -> Value {
    json!({"transfer": {"id": id, "size": size, "sha256": sha, "chunk_size": 1024}})
}

fn chunk(id: &str, data: &[u8], index: usize) -> String {
    use base64::Engine as _;
    use sha2::Digest;
    let part = &data[index * 1024..((index + 1) * 1024).min(data.len())];
    json!({"chunk": {
        "transfer": id, "index": index,
        "sha256": hex::encode(sha2::Sha256::digest(part)),
        "data": base64::engine::general_purpose::STANDARD.encode(part),
    }})
    .to_string()
}

/// Attack 3: announcements filled the disk (an 8 GiB declared size wrote a
/// 50 MB state file). Now, even with unsigned requests allowed, the size is
/// checked against `max_bundle_bytes` and free space before anything is
/// written, at most `max_transfers` are open, idle ones expire, the state
/// stays small, and chunks after completion get no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_announcements_cannot_fill_the_disk() {
    use sha2::Digest;
    let mut r = rig(
        "require_signed_requests = false\nmax_bundle_bytes = 1048576\nmax_transfers = 2\n\
         transfer_expiry_secs = 4",
    )
    .await;
    let transfers = r.state("bundles/.transfers");
    let zeros = "0".repeat(64);
    r.send(transfer("huge0", 8 << 30, &zeros).to_string()).await;
    let s = r.refused_now().await;
    assert_eq!(s["reason"], "too_large", "{s}");
    assert!(files_in(&transfers).is_empty());

    // Two may be open; a third is refused. A 1 MiB transfer of 1 KiB
    // chunks keeps a state file well under 1 KiB.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let sha = hex::encode(sha2::Sha256::digest(&data));
    r.send(transfer("t1", 4096, &sha).to_string()).await;
    status_until(&mut r.sub, &r.status, |s| s["transfer"] == "t1").await;
    r.send(transfer("t2", 1 << 20, &zeros).to_string()).await;
    let s = status_until(&mut r.sub, &r.status, |s| s["transfer"] == "t2").await;
    assert_eq!(s["chunks"], 1024);
    r.send(transfer("t3", 4096, &zeros).to_string()).await;
    let s = r.refused_now().await;
    assert_eq!(s["reason"], "not_allowed", "{s}");
    let state_size = std::fs::metadata(transfers.join("t2.json")).unwrap().len();
    assert!(state_size < 1024, "t2.json is {state_size} bytes");

    // t1 completes (it is no bundle, so the install is refused and the
    // transfer removed); its chunks sent again get no answer.
    for i in 0..4 {
        r.send(chunk("t1", &data, i)).await;
    }
    assert!(r.refused_install().await.starts_with("not_a_bundle"));
    for i in [3, 0] {
        r.send(chunk("t1", &data, i)).await;
    }
    let said: Vec<Value> = r
        .sub
        .extra(Duration::from_secs(3))
        .await
        .into_iter()
        .filter(|m| m.topic == r.status)
        .map(|m| m.json())
        .collect();
    assert!(said.is_empty(), "{said:?}");

    // t2 received nothing for longer than the expiry: the next
    // announcement deletes it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.send(transfer("t4", 4096, &zeros).to_string()).await;
    status_until(&mut r.sub, &r.status, |s| s["transfer"] == "t4").await;
    let mut left = files_in(&transfers);
    left.sort();
    assert_eq!(left, vec!["t4.json", "t4.slmdb"]);
    assert!(r.daemon.is_running());
}

/// Sends request `r-<n>` naming `response`; the reason of its error.
async fn ask(app: &mut V5Client, sub: &mut Client, n: usize, response: &str) -> String {
    let msg = format!(r#"{{"id": "r-{n}", "text": "turn on the lights"}}"#);
    app.request("test/home/hall", msg, response, b"c").await;
    let err = loop {
        let m = sub
            .next(Duration::from_secs(60))
            .await
            .expect("an error result");
        if m.topic == "test/err/home" {
            break m.json();
        }
        assert!(
            !m.topic.contains("model/update"),
            "{}: {}",
            m.topic,
            m.json()
        );
    };
    assert_eq!(err["id"], format!("r-{n}"), "{err}");
    err["error"]["reason"].as_str().unwrap().to_owned()
}

/// Attack 4: `response_topics` allowed "#", so a request could make slmd
/// publish on any topic, its own control topic included. Now none is
/// allowed by default, and slmd's own topics and `$` topics are refused
/// whatever the configuration allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_cannot_be_another_consumers_or_slmds_own() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let id = client_id(&config);
    let mut sub = Client::connect(broker.port, &["test/err/#", "slmd/#", "hermes/#"]).await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;
    let mut app = V5Client::connect(broker.port, &["other/#"]).await;
    let t = Duration::from_secs(60);
    // Defaults: another consumer's topic is refused.
    assert_eq!(
        ask(&mut app, &mut sub, 1, "other/consumer/commands").await,
        "response_topic_refused"
    );

    // Even with "#" allowed: slmd's own topics and $ topics.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[limits]\n", "[limits]\nresponse_topics = [\"#\"]\n");
    std::fs::write(&config, text).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(60))
        .await;
    let own = [
        format!("slmd/{id}/model/update"),
        format!("slmd/{id}/model/status"),
        format!("slmd/{id}/status"),
        "hermes/injection/perform".to_owned(),
        "slmd/dead-letter".to_owned(),
        "test/home/loop".to_owned(),
        "$SYS/broker/x".to_owned(),
    ];
    for (n, topic) in own.iter().enumerate() {
        assert_eq!(
            ask(&mut app, &mut sub, 10 + n, topic).await,
            "response_topic_refused",
            "{topic}"
        );
    }
    // What "#" is for still works.
    app.request(
        "test/home/hall",
        r#"{"id": "r-ok", "text": "turn on the lights"}"#,
        "other/replies/1",
        b"c",
    )
    .await;
    let got = app.next(t).await.expect("a result on the response topic");
    assert_eq!(got.topic, "other/replies/1");
    assert_eq!(got.json()["id"], "r-ok");
    let status = format!("slmd/{id}/model/status");
    let stray = sub.extra(Duration::from_secs(1)).await;
    assert!(
        stray
            .iter()
            .all(|m| m.topic != status && !m.topic.contains("update")),
        "{:?}",
        stray.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
}

/// A TLS listener with the server certificate `cert` (`server` or `wrong`)
/// and no client certificate required, beside a plain one; returns the
/// broker, the TLS port and the certificates' directory.
fn tls_broker(cert: &str) -> (Broker, u16, std::path::PathBuf) {
    let (plain, tls_port) = (crate::util::free_port(), crate::util::free_port());
    let dir = Broker::dir();
    crate::util::make_certs(dir.path());
    let certs = dir.path().to_path_buf();
    let listener = format!(
        "listener {tls_port} 127.0.0.1\ncafile {c}/ca.crt\ncertfile {c}/{cert}.crt\n\
         keyfile {c}/{cert}.key\n",
        c = certs.display()
    );
    let broker = Broker::start_in(dir, plain, &listener);
    crate::util::wait_for_port(tls_port, Duration::from_secs(10));
    (broker, tls_port, certs)
}

/// Server authentication only: the broker's certificate is verified
/// against the CA and must name 127.0.0.1; one for another name is
/// refused, and the daemon keeps retrying without ever subscribing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_broker_and_refuses_a_certificate_for_another_name() {
    let (broker, tls_port, certs) = tls_broker("server");
    let work = tempfile::tempdir().unwrap();
    let tls = format!("[broker.tls]\nca_file = \"{}/ca.crt\"\n", certs.display());
    let config = write_config(work.path(), tls_port, &tls);
    let mut sub = Client::connect(broker.port, &["test/out/#"]).await;
    let url = format!("mqtt://127.0.0.1:{tls_port}");
    let mut daemon = Daemon::start(&config, &url);
    daemon.wait_subscribed().await;
    sub.publish(
        "test/home/x",
        r#"{"id": "tls-s", "text": "make me a coffee"}"#,
    )
    .await;
    assert_eq!(
        sub.take(1, Duration::from_secs(60)).await[0].json()["id"],
        "tls-s"
    );
    daemon.terminate();

    let (_wrong_broker, wrong_port, wrong_certs) = tls_broker("wrong");
    let work2 = tempfile::tempdir().unwrap();
    let tls = format!(
        "[broker.tls]\nca_file = \"{}/ca.crt\"\n",
        wrong_certs.display()
    );
    let config = write_config(work2.path(), wrong_port, &tls);
    let mut refused = Daemon::start(&config, &format!("mqtt://127.0.0.1:{wrong_port}"));
    refused
        .wait_for_log("retrying in", Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = refused.log_text();
    assert!(refused.is_running());
    assert!(!log.contains("connected to broker"), "{log}");
    assert!(log.contains("certificate not valid for name"), "{log}");
}

/// The ACL example of docs/SECURITY.md (configs/mosquitto/slmd.acl) on a
/// real mosquitto, the device logging in with a password from a file:
/// another user's request on the device's control topic never reaches
/// slmd, even with signatures not required; the update service's does.
/// The password is not in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_example_keeps_other_clients_off_the_control_topic() {
    let dir = Broker::dir();
    let work = tempfile::tempdir().unwrap();
    let k = keys(work.path(), "k");
    let (open, locked) = (crate::util::free_port(), crate::util::free_port());
    let config = write_config(
        work.path(),
        locked,
        &updates(&k, "require_signed_requests = false"),
    );
    let id = client_id(&config);
    let passwords = dir.path().join("passwords");
    for (n, (user, pw)) in [
        (id.as_str(), "dev-pw-1"),
        ("slmd-updater", "up-pw"),
        ("intruder", "in-pw"),
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if n == 0 {
            cmd.arg("-c");
        }
        assert!(cmd
            .arg(&passwords)
            .args([user, pw])
            .status()
            .unwrap()
            .success());
    }
    // The example, with the test task's topics for the device's.
    let acl = std::fs::read_to_string(crate::util::repo_root().join("configs/mosquitto/slmd.acl"))
        .unwrap()
        .replace("kitchen-pi", &id)
        .replace("home/+/command", "test/home/+")
        .replace("slmd/home/#", "test/#");
    std::fs::write(dir.path().join("slmd.acl"), acl).unwrap();
    for f in ["passwords", "slmd.acl"] {
        let perms = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        std::fs::set_permissions(dir.path().join(f), perms).unwrap();
    }
    let conf = format!(
        "per_listener_settings true\nlistener {locked} 127.0.0.1\nallow_anonymous false\n\
         password_file {d}/passwords\nacl_file {d}/slmd.acl\n",
        d = dir.path().display()
    );
    let _broker = Broker::start_in(dir, open, &conf);
    crate::util::wait_for_port(locked, Duration::from_secs(10));
    let pw_file = work.path().join("mqtt-password");
    std::fs::write(&pw_file, "dev-pw-1\n").unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "keep_alive_secs = 30\n",
        &format!(
            "keep_alive_secs = 30\nusername = \"{id}\"\npassword_file = \"{}\"\n",
            pw_file.display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let status = format!("slmd/{id}/model/status");
    let control = format!("slmd/{id}/model/update");
    let mut sub = Client::connect(open, &[&status]).await;
    let mut daemon = Daemon::start(&config, &format!("mqtt://127.0.0.1:{locked}"));
    daemon.wait_subscribed().await;
    status_until(&mut sub, &status, |s| s["state"] == "idle").await;

    let publish = |user: &str, pw: &str, source: &str| {
        let ok = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &locked.to_string(), "-q", "1"])
            .args(["-u", user, "-P", pw, "-t", &control])
            .args(["-m", &json!({"source": source}).to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    publish("intruder", "in-pw", "/from/intruder");
    let said = sub.extra(Duration::from_secs(3)).await;
    assert!(
        said.is_empty(),
        "{:?}",
        said.iter().map(|m| m.json()).collect::<Vec<_>>()
    );
    publish("slmd-updater", "up-pw", "/from/updater");
    status_until(&mut sub, &status, |s| s["state"] == "received").await;
    // Taken, then refused by slmd's own rule (no source_dir).
    let s = status_until(&mut sub, &status, |s| s["last"]["outcome"] == "refused").await;
    assert!(
        s["last"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("not_allowed"),
        "{s}"
    );
    assert!(!daemon.log_text().contains("dev-pw-1"));
}

/// Entity injection changes what slmd answers, so it falls under the same
/// rule as model control: unsigned requests are refused by default, a
/// signed one is applied, a replayed one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_injection_must_be_signed_by_default() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path(), "k");
    let id = format!(
        "slmd-inject-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let config = dir.path().join("slmd.toml");
    let text = format!(
        r#"
[broker]
port = {port}
client_id = "{id}"
max_backoff_secs = 1
[state]
dir = "{state}"
[model]
path = "{model}"
threads = 2
[log]
level = "debug"
[updates]
trusted_keys = ["{key}"]
[[tasks]]
name = "assist"
kind = "extract"
protocol = "hermes"
topics = ["hermes/nlu/query"]
output_topic = "hermes/intent"
examples_file = "{examples}"
{schema}
"#,
        schema = crate::util::HA_EXTRACT_SCHEMA,
        port = broker.port,
        state = dir.path().join("state").display(),
        model = crate::util::model_path().display(),
        key = k.public,
        examples = crate::util::repo_root()
            .join("tests/fixtures/ha-lights.jsonl")
            .display(),
    );
    std::fs::write(&config, text).unwrap();
    let mut sub = Client::connect(
        broker.port,
        &["hermes/injection/complete", "hermes/error/#"],
    )
    .await;
    let mut daemon = Daemon::start(&config, &broker.url());
    daemon.wait_subscribed().await;

    let request = json!({"id": "inj1", "operations": [["add", {"area": ["Attic"]}]]});
    sub.publish("hermes/injection/perform", request.to_string())
        .await;
    let m = sub
        .next(Duration::from_secs(180))
        .await
        .expect("an injection answer");
    assert_eq!(m.topic, "hermes/error/injection");
    assert_eq!(m.json()["context"], "unsigned", "{}", m.json());
    assert!(!dir.path().join("state/injections.json").exists());

    let request = json!({"id": "inj2", "operations": [["add", {"area": ["Attic"]}]],
                         "seq": 1, "device": id});
    let wrapped = signed(&k, &request);
    sub.publish("hermes/injection/perform", wrapped.clone())
        .await;
    let m = sub
        .next(Duration::from_secs(180))
        .await
        .expect("an injection answer");
    assert_eq!(m.topic, "hermes/injection/complete", "{}", m.json());
    assert_eq!(m.json()["requestId"], "inj2");
    let saved = std::fs::read_to_string(dir.path().join("state/injections.json")).unwrap();
    assert!(saved.contains("Attic"), "{saved}");

    sub.publish("hermes/injection/perform", wrapped).await;
    let m = sub
        .next(Duration::from_secs(180))
        .await
        .expect("an injection answer");
    assert_eq!(m.topic, "hermes/error/injection");
    assert_eq!(m.json()["context"], "replayed", "{}", m.json());
    assert!(daemon.is_running());
}
