//! Shared fixtures: a real mosquitto on a free loopback port, the real slmd
//! binary, the real SmolLM2 model, and an MQTT client that waits with a
//! deadline.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::mpsc;

pub fn repo_root() -> PathBuf {
    // crates/cli, the binary's package.
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    package.ancestors().nth(2).unwrap().to_path_buf()
}

/// A free loopback port, never the same one twice in this test binary (a
/// test that wants nothing listening must not meet another test's broker).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if !taken.contains(&port) {
            taken.push(port);
            return port;
        }
    }
}

/// The default model, fetched into `<repo>/.cache/state` on first use.
pub fn model_path() -> PathBuf {
    static FETCH: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached.as_ref() {
        return p.clone();
    }
    let root = repo_root();
    let manifest =
        slmd_engine::models::find_manifest(&root.join("models"), "smollm2-135m-instruct-q4_1")
            .unwrap();
    let store = slmd_engine::models::ModelStore::open(&root.join(".cache/state")).unwrap();
    let path = match store.installed(&manifest) {
        Some(p) => p,
        None => store.fetch(&manifest).expect("fetching the test model"),
    };
    *cached = Some(path.clone());
    path
}

/// The installed file of templates manifest `name` (fetched into .cache
/// on first use, as the model is).
pub fn templates_path(name: &str) -> PathBuf {
    let root = repo_root();
    let manifest = slmd_engine::models::find_kind(
        &root.join("models"),
        name,
        slmd_engine::models::Kind::Templates,
    )
    .unwrap();
    let store = slmd_engine::models::ModelStore::open(&root.join(".cache/state")).unwrap();
    match store.installed(&manifest) {
        Some(p) => p,
        None => store.fetch(&manifest).expect("fetching the test templates"),
    }
}

/// A mosquitto process on its own port, killed on drop.
pub struct Broker {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Broker {
        Broker::start_with(port, false)
    }

    /// With `persistence`, sessions and queued messages survive a restart.
    pub fn start_with(port: u16, persistence: bool) -> Broker {
        let dir = Broker::dir();
        let persist = if persistence {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".into()
        };
        Broker::start_in(dir, port, &persist)
    }

    /// A directory for the broker's files. mosquitto started as root runs
    /// as user mosquitto: let it read and write there.
    pub fn dir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }

    /// The `extra` configuration lines (first, so they may set global
    /// options such as `per_listener_settings`), then an anonymous plain
    /// listener on `port`.
    pub fn start_in(dir: tempfile::TempDir, port: u16, extra: &str) -> Broker {
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "{extra}listener {port} 127.0.0.1\nallow_anonymous true\n\
                 max_queued_messages 0\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n\
                 log_type warning\n"
            ),
        )
        .unwrap();
        let child = Broker::spawn(dir.path(), port);
        Broker { port, child, dir }
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (scripts/setup.sh installs it)");
        wait_for_port(port, Duration::from_secs(10));
        child
    }

    /// Stops the broker as an operator would (SIGTERM: a persistent broker
    /// saves its state).
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }

    /// Starts it again on the same port with the same configuration.
    pub fn restart(&mut self) {
        self.child = Broker::spawn(self.dir.path(), self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The slots and labels of the extract tasks over four Home Assistant
/// intents (TOML, inside a `[[tasks]]` table).
pub const HA_EXTRACT_SCHEMA: &str = r#"slots = [
  { name = "area", type = "enum", values = ["Kitchen", "Living Room", "Bedroom"] },
  { name = "floor", type = "enum", values = ["First Floor", "Second Floor"] },
  { name = "domain", type = "enum", open = true, values = ["light", "fan", "script"] },
  { name = "name", type = "string" },
  { name = "brightness", type = "number" },
  { name = "color", type = "string" },
]
labels = [
  { name = "HassTurnOn" }, { name = "HassTurnOff" },
  { name = "HassLightSet" }, { name = "HassMediaPause", slots = ["area", "name"] },
]
"#;

/// The smart-home task used by most tests; `extra` is appended to the file.
pub fn write_config(dir: &Path, broker_port: u16, extra: &str) -> PathBuf {
    let root = repo_root();
    let path = dir.join("slmd.toml");
    let text = format!(
        r#"
[broker]
port = {broker_port}
client_id = "slmd-test-{nonce}"
keep_alive_secs = 30
max_backoff_secs = 1

[state]
dir = "{state}"

[model]
path = "{model}"
threads = 2
context_size = 1024

[limits]
max_payload_bytes = 2048
max_text_chars = 300

[log]
level = "debug"

[[tasks]]
name = "home"
kind = "classify"
topics = ["test/home/+"]
output_topic = "test/out/home"
error_topic = "test/err/home"
instruction = "Classify this smart-home command."
examples_file = "{examples}"
labels = [
  {{ name = "lights_on" }}, {{ name = "lights_off" }}, {{ name = "lights_dim" }},
  {{ name = "lights_brighten" }}, {{ name = "lights_colour" }}, {{ name = "make_coffee" }},
  {{ name = "vacuum" }}, {{ name = "plug_on" }}, {{ name = "plug_off" }},
]
{extra}
"#,
        nonce = dir.file_name().unwrap().to_string_lossy(),
        state = dir.join("state").display(),
        model = model_path().display(),
        examples = root
            .join("configs/examples/smart-home-hwu64.jsonl")
            .display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces the first `from` in a config file with `to`.
pub fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} is not in the config");
    std::fs::write(config, text.replacen(from, to, 1)).unwrap();
}

/// The slmd binary running `run`, stopped on drop; its log is kept in a file.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, broker_url: &str) -> Daemon {
        Daemon::start_logged(config, broker_url, &config.with_extension("log"))
    }

    /// As [`Daemon::start`], logging to `log` (one file per run).
    pub fn start_logged(config: &Path, broker_url: &str, log: &Path) -> Daemon {
        Daemon::start_env(config, broker_url, log, &[])
    }

    /// As [`Daemon::start_logged`], with extra environment variables.
    pub fn start_env(config: &Path, broker_url: &str, log: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(config, broker_url, log, env, &[])
    }

    /// As [`Daemon::start_logged`], with extra `slmd run` arguments (such
    /// as `--no-inference`).
    pub fn start_args(config: &Path, broker_url: &str, log: &Path, args: &[&str]) -> Daemon {
        Daemon::start_full(config, broker_url, log, &[], args)
    }

    /// With extra environment variables and extra `slmd run` arguments.
    pub fn start_full(
        config: &Path,
        broker_url: &str,
        log: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        let log = log.to_path_buf();
        let child = Command::new(env!("CARGO_BIN_EXE_slmd"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--broker", broker_url])
            .args(args)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGTERM, as systemd stops a service; SIGKILL after 10 s.
    pub fn terminate(&mut self) {
        terminate(&mut self.child);
    }

    /// Waits until the daemon's subscriptions are in place (messages
    /// published before that would not be queued for it on a fresh broker).
    pub async fn wait_subscribed(&mut self) {
        self.wait_for_log("subscribed to", Duration::from_secs(120))
            .await;
    }

    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            assert!(self.is_running(), "slmd exited; log:\n{}", self.log_text());
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "slmd did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A message seen by the test client.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 correlation data (only [`V5Client`] sees it).
    pub correlation: Option<Vec<u8>>,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "{} carried no JSON ({e}): {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// A real MQTT client (rumqttc) subscribed to `filters`.
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl Client {
    /// A persistent session that reconnects by itself, and subscribes
    /// again when the broker lost the session (a restart without
    /// persistence).
    pub async fn connect(port: u16, filters: &[&str]) -> Client {
        let id = format!("test-client-{}-{}", std::process::id(), free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        // Bundle chunks are large messages.
        opts.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed_rx) = mpsc::unbounded_channel();
        let filters_owned: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let resubscribe = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) if !ack.session_present => {
                        for f in &filters_owned {
                            let _ = resubscribe.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            correlation: None,
                        });
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for _ in filters {
            tokio::time::timeout(Duration::from_secs(10), subscribed_rx.recv())
                .await
                .expect("subscription acknowledged");
        }
        Client { client, rx }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// The next `n` messages, or a panic naming how many came by the deadline.
    pub async fn take(&mut self, n: usize, timeout: Duration) -> Vec<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => got.push(m),
                _ => panic!(
                    "expected {n} messages within {timeout:?}, got {}: {got:?}",
                    got.len()
                ),
            }
        }
        got
    }

    /// The next message, if one comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Msg> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Whatever else arrives within `wait` (to prove nothing extra came).
    pub async fn extra(&mut self, wait: Duration) -> Vec<Msg> {
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(wait, self.rx.recv()).await {
            got.push(m);
        }
        got
    }
}

/// An MQTT 5 client, for requests that name a response topic. (The other
/// tests use MQTT 3.1.1 clients, as many field devices still do.)
pub struct V5Client {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl V5Client {
    pub async fn connect(port: u16, filters: &[&str]) -> V5Client {
        use rumqttc::v5::{mqttbytes::QoS, Event, Incoming};
        let id = format!("test-v5-{}-{}", std::process::id(), free_port());
        let opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed_rx) = mpsc::unbounded_channel();
        let subs = filters.iter().map(|f| Filter::new(*f, QoS::AtLeastOnce));
        client.subscribe_many(subs).await.unwrap();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            correlation: p
                                .properties
                                .and_then(|pr| pr.correlation_data)
                                .map(|c| c.to_vec()),
                        });
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx.recv())
            .await
            .expect("subscription acknowledged");
        V5Client { client, rx }
    }

    /// Publishes `payload` asking for the answer on `response_topic`.
    pub async fn request(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response_topic: &str,
        correlation: &[u8],
    ) {
        let properties = PublishProperties {
            response_topic: Some(response_topic.into()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.into(),
                properties,
            )
            .await
            .unwrap();
    }

    pub async fn next(&mut self, timeout: Duration) -> Option<Msg> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// A CA, a server certificate for 127.0.0.1, a client certificate and a
/// server certificate for another name, made with the openssl command in
/// `dir`: `ca.crt`, `server.{crt,key}`, `client.{crt,key}`,
/// `wrong.{crt,key}` (world-readable, for a broker running as mosquitto).
pub fn make_certs(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=slmd test CA",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    std::fs::write(dir.join("wrong.ext"), "subjectAltName=DNS:wrong.example\n").unwrap();
    for (name, cn) in [
        ("server", "/CN=127.0.0.1"),
        ("client", "/CN=slmd"),
        ("wrong", "/CN=wrong.example"),
    ] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", cn],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
    for f in std::fs::read_dir(dir).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let f = f.unwrap().path();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// A broker, the daemon on the test task, and a client watching its results
/// and errors, with the daemon's subscriptions in place.
pub struct Running {
    pub broker: Broker,
    pub daemon: Daemon,
    pub sub: Client,
    /// Holds the config and the state directory.
    pub dir: tempfile::TempDir,
}

impl Running {
    pub async fn start() -> Running {
        Running::with(&["test/out/#", "test/err/#"], |dir, port| {
            write_config(dir, port, "")
        })
        .await
    }

    /// A shipped pack ([`pack_config`]), the client watching `filters`.
    pub async fn pack(pack: &str, filters: &[&str]) -> Running {
        Running::with(filters, |dir, port| pack_config(dir, port, pack)).await
    }

    pub async fn with(filters: &[&str], config: impl FnOnce(&Path, u16) -> PathBuf) -> Running {
        let broker = Broker::start();
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), broker.port);
        let sub = Client::connect(broker.port, filters).await;
        let mut daemon = Daemon::start(&config, &broker.url());
        daemon.wait_subscribed().await;
        Running {
            broker,
            daemon,
            sub,
            dir,
        }
    }
}

/// The test task's labels.
pub const LABELS: &[&str] = &[
    "lights_on",
    "lights_off",
    "lights_dim",
    "lights_brighten",
    "lights_colour",
    "make_coffee",
    "vacuum",
    "plug_on",
    "plug_off",
];

/// Serves one file over HTTP/1.1 on loopback, honouring `Range: bytes=N-`
/// (206). With `break_first`, the first response promises the whole file
/// and closes the connection halfway (a dropped link). Returns the URL;
/// the server lives as long as the test process.
pub fn serve_file(path: &Path, break_first: bool) -> String {
    use std::io::{BufRead, BufReader, Write};
    let body = std::fs::read(path).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut first = true;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut from = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    from = r.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
            }
            let rest = &body[from.min(body.len())..];
            let status = if from > 0 {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                rest.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let send = if break_first && first {
                &rest[..rest.len() / 2]
            } else {
                rest
            };
            first = false;
            let _ = conn.write_all(send);
        }
    });
    format!("http://127.0.0.1:{port}/bundle.slmdb")
}

/// A shipped pack (`configs/<pack>.toml`) as the daemon would run it, with
/// only what a test must change: the broker port, a unique client id, a
/// state directory in `dir`, the test model, and example paths made
/// absolute (the file is written to `dir`).
pub fn pack_config(dir: &Path, broker_port: u16, pack: &str) -> PathBuf {
    let configs = repo_root().join("configs");
    let text = std::fs::read_to_string(configs.join(format!("{pack}.toml"))).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let nonce = dir.file_name().unwrap().to_string_lossy().into_owned();
    let broker = doc["broker"].as_table_mut().unwrap();
    broker.insert("port".into(), i64::from(broker_port).into());
    let id = format!("{}-{nonce}", broker["client_id"].as_str().unwrap());
    broker.insert("client_id".into(), id.into());
    broker.insert("max_backoff_secs".into(), 1.into());
    let state = dir.join("state").display().to_string();
    doc.insert(
        "state".into(),
        toml::Table::from_iter([("dir".into(), state.into())]).into(),
    );
    let model = doc["model"].as_table_mut().unwrap();
    model.remove("name");
    model.remove("manifests");
    model.insert("path".into(), model_path().display().to_string().into());
    let absolute = |v: &toml::Value| -> toml::Value {
        configs
            .join(v.as_str().unwrap())
            .display()
            .to_string()
            .into()
    };
    for task in doc["tasks"].as_array_mut().unwrap() {
        let task = task.as_table_mut().unwrap();
        let files = match task.get("examples_file") {
            Some(toml::Value::Array(a)) => a.iter().map(absolute).collect(),
            Some(one) => vec![absolute(one)],
            None => continue,
        };
        task.insert("examples_file".into(), toml::Value::Array(files));
        if let Some(t) = task
            .get_mut("templates")
            .and_then(toml::Value::as_table_mut)
        {
            let sources: Vec<toml::Value> = t["sources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    templates_path(s.as_str().unwrap())
                        .display()
                        .to_string()
                        .into()
                })
                .collect();
            t.insert("sources".into(), sources.into());
            if let Some(home) = t.get("home").map(absolute) {
                t.insert("home".into(), home);
            }
        }
    }
    // Tests run beside each other on two cores, where one inference has
    // taken 12 s: longer than a car's state stays fresh (10 s), which
    // turned "moving" into "speed_unknown". Staleness has its own unit
    // tests (policy); here a state stays fresh for the whole test.
    for task in doc["tasks"].as_array_mut().unwrap() {
        let policy = task.get_mut("policy").and_then(toml::Value::as_table_mut);
        if let Some(policy) = policy.filter(|p| p.contains_key("state_max_age_secs")) {
            policy.insert("state_max_age_secs".into(), 3600.into());
        }
    }
    let path = dir.join(format!("{pack}.toml"));
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}
