//! slmd: an offline small-language-model daemon for embedded Linux.
//!
//! ```text
//!  MQTT broker ──► slmd_link (receiver) ──► slmd_store: inbox ──► router ──► slmd_engine
//!      ▲            persist, flush,          (sled, durable)       task,     (llama.cpp
//!      │            then PUBACK                                    payload    thread,
//!      │                                                           checks     batched)
//!      │                                                              │
//!      └──────────── slmd_link (publisher) ◄── slmd_store: outbox ◄───┘
//!                    removed on PUBACK          (same key, one transaction)
//! ```
//!
//! The stages outside this crate: [`slmd_link`] (the broker link),
//! [`slmd_store`] (the durable inbox and outbox), [`slmd_engine`] (the
//! llama.cpp model, heads, slots and the model store), [`slmd_bundle`]
//! (signed model bundles and their store, re-exported as [`bundle`]),
//! [`slmd_core`] (shared types). This crate is the daemon around them (the
//! `slmd` binary, crates/cli, parses arguments and calls it; `slmd eval`,
//! `bench` and `replay` are crate slmd-tools, which depends on this one);
//! its modules depend on each other one way, and this file on all of them:
//!
//! - [`config`]: the TOML file, validated whole before anything starts.
//! - [`router`]: inbox to outbox: route, dedup, dispatch, commit.
//! - [`answer`]: a task's result or error in its protocol.
//! - [`payload`], [`hermes`]: slmd's own JSON and the Hermes protocol.
//! - [`policy`]: a task's safety rules (vehicle speed, quantities, refusals).
//! - [`control`]: model update requests and entity injections from MQTT,
//!   checked and handed to the supervisor.
//! - [`injection`]: Hermes entity injection (the stored entities).
//! - [`monitor`]: factory-line anomaly notes: sensor windows, detectors,
//!   notes whose cause the model picks.
//! - [`serving`]: from a configuration to an engine (which model, which
//!   task specs, which topics).
//! - [`supervisor`]: every engine change: reloads, injections, model
//!   updates, health checks, rollback.
//! - [`update`]: one model update end to end (fetch, install, canary,
//!   switch).
//! - [`notify`]: systemd's notify socket and watchdog.
//! - [`metrics`], [`status`]: the Prometheus endpoint; `slmd status`.
//! - [`error`]: why the daemon cannot run, and the exit code it implies.
//! - [`cli`]: what the `slmd` command's subcommands share (loading a
//!   config, the state and manifest directories).
//! - [`fuzzing`]: the fuzz targets' entry points and the corpus replay.
//! - [`logging`]: the journal or stderr.

pub mod answer;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod escalate;
pub mod fuzzing;
pub mod hermes;
pub mod injection;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod payload;
pub mod policy;
pub mod router;
pub mod serving;
pub mod status;
pub mod supervisor;
pub mod update;

pub use error::RunError;
use serving::{build_engine, topic_filters};
pub use serving::{
    bundle_model, configured_model, locate_model, start_engine, start_engine_with, task_spec,
    Inference, ModelRef,
};
pub use slmd_bundle as bundle;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use config::Config;
use slmd_engine::models::ModelStore;
use slmd_engine::Engine;

/// What `slmd check-config` finds about the files a valid configuration
/// names beyond those [`Config::validate`] reads: the model reference.
#[derive(Debug, Default)]
pub struct FileCheck {
    /// Errors: the configuration cannot run as written.
    pub problems: Vec<config::Problem>,
    /// Worth saying, but the configuration is right (a model to fetch).
    pub notes: Vec<String>,
}

/// Resolves the model `[model]` names without loading it or writing
/// anything: a manifest name must have a manifest in `model.manifests`
/// (not yet installed is a note: `slmd model fetch` installs it), a path
/// must be a GGUF file. An active bundle, which serves instead, is noted;
/// the configured model still matters, as a rollback's last resort.
pub fn check_files(config: &Config, config_path: &Path) -> FileCheck {
    let mut out = FileCheck::default();
    let mut problem = |key: &str, message: String| {
        out.problems.push(config::Problem {
            key: key.into(),
            message,
        })
    };
    if let Some(path) = &config.model.path {
        let path = config.resolve(path);
        match slmd_engine::models::gguf::describe(&path) {
            Ok(_) => {}
            Err(e) => problem("model.path", format!("{}: {e}", path.display())),
        }
    } else if let Some(name) = &config.model.name {
        let manifests = config.resolve(&config.model.manifests);
        match slmd_engine::models::find_kind(&manifests, name, slmd_engine::models::Kind::Model) {
            Err(e) => problem("model.name", e.to_string()),
            Ok(m) => {
                if ModelStore::installed_in(&config.state_dir(), &m).is_none() {
                    out.notes.push(format!(
                        "model {name:?} is not installed in {}: run `slmd model fetch {name} \
                         --config {}` before `slmd run`",
                        config.state_dir().join("models").display(),
                        config_path.display()
                    ));
                }
            }
        }
    }
    // Template stages compile as they would at start-up; not yet fetched
    // templates are a note, as a model is.
    for (i, t) in config.tasks.iter().enumerate() {
        let config::TaskKind::Extract(e) = &t.kind else {
            continue;
        };
        let Some(tc) = &e.templates else { continue };
        match serving::template_stage(config, tc, &e.slots) {
            Ok(_) => {}
            Err(error::RunError::NotInstalled { name, .. }) => out.notes.push(format!(
                "templates {name:?} are not installed: run `slmd model fetch {name} --config {}`",
                config_path.display()
            )),
            Err(e) => problem(&format!("tasks[{i}].templates"), e.to_string()),
        }
    }
    // Opening the bundle store creates it: look only where one exists.
    if config.state_dir().join("bundles/current.json").is_file() {
        match bundle::store::BundleStore::open(&config.state_dir()).and_then(|s| s.active()) {
            Ok(Some(b)) => out.notes.push(format!(
                "bundle {} {} is active and serves instead of [model]",
                b.manifest.name, b.manifest.version
            )),
            Ok(None) => {}
            Err(e) => out
                .notes
                .push(format!("the bundle store cannot be read: {e}")),
        }
    }
    out
}

/// Topics an MQTT 5 response topic may never name, whatever
/// `limits.response_topics` allows: slmd's own control, status,
/// injection and dead-letter topics (input topics are checked per task).
fn reserved_topics(config: &Config) -> Vec<String> {
    let escalation = config
        .tasks
        .iter()
        .filter_map(|t| t.escalate.as_ref())
        .flat_map(|e| [e.topic.clone(), e.reply_topic.clone()])
        .flatten();
    [
        config.updates.control_topic(&config.broker),
        config.updates.status_topic(&config.broker),
        config.broker.status_topic(),
        config.limits.dead_letter_topic.clone(),
        "hermes/injection/#".to_owned(),
        "hermes/error/#".to_owned(),
        format!("slmd/{}/#", config.broker.client_id),
    ]
    .into_iter()
    .chain(escalation)
    .collect()
}

/// Runs the daemon until `shutdown` turns true; applies the configurations
/// sent on `reloads` (SIGHUP) while it runs.
pub async fn run(
    config: Config,
    broker: Option<slmd_link::BrokerAddr>,
    inference: Inference,
    reloads: tokio::sync::mpsc::Receiver<Config>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    // State files (store, status snapshot, heads) readable by the group only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    let notifier = notify::Notifier::from_env();
    for w in config.warnings() {
        log::warn!("{w}");
    }
    notifier.status("opening the store");
    let _lock = slmd_store::lock::StateLock::acquire(&config.state_dir())?;
    let store = slmd_store::Store::open_with(
        &config.state_dir(),
        slmd_store::Settings {
            cache_bytes: config.state.cache_bytes,
            max_seen_bytes: config.limits.max_dedup_bytes,
        },
    )?;
    let stats = store.stats()?;
    log::info!(
        "store open at {}: {} message(s) waiting, {} result(s) unsent",
        config.state_dir().display(),
        stats.inbox,
        stats.outbox
    );
    if store.mark_running().await? {
        let n = store.blame_dispatched().await?;
        log::warn!(
            "the last run did not stop cleanly: {n} message(s) it had handed to the engine \
             run again one at a time"
        );
    }
    let bundles = bundle::store::BundleStore::open(&config.state_dir())?;
    if let Some(why) = bundles.on_start(config.updates.max_trial_starts)? {
        log::error!("model bundle rolled back: {why}");
    }
    let load_started = std::time::Instant::now();
    // A model load (and head training) can outlast systemd's start timeout
    // on a slow device: keep extending it while it runs.
    let extend = {
        let notifier = notifier.clone();
        tokio::spawn(async move {
            loop {
                let doing = match serving::STARTING.get() {
                    s if s.is_empty() => "loading the model".to_owned(),
                    s => format!("starting: {s}"),
                };
                notifier.send(&format!("EXTEND_TIMEOUT_USEC=30000000\nSTATUS={doing}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let engine = build_engine(&config, inference).await;
    extend.abort();
    let engine = engine?;
    log::info!("serving with {}", supervisor::describe(&engine));
    crash_if_asked(&engine);

    let addr = broker.unwrap_or(slmd_link::BrokerAddr {
        host: config.broker.host.clone(),
        port: config.broker.port,
    });
    let metrics = Arc::new(metrics::Metrics::new(load_started.elapsed().as_secs_f64()));
    // Ready to work: the broker may come later (slmd works offline).
    notifier.send("READY=1\nSTATUS=model loaded, connecting to the broker");
    let mqtt_beat = Arc::new(slmd_link::Heartbeat::default());
    let (link, eventloop) = slmd_link::Link::new(
        slmd_link::options(
            &config.broker,
            &config.base_dir,
            config.limits.max_packet_bytes,
            &addr,
        )?,
        store.clone(),
        slmd_link::Intake {
            quota: config.limits.max_store_bytes,
            max_payload: config.limits.max_payload_bytes,
            whole: vec![
                config.updates.control_topic(&config.broker),
                injection::PERFORM_TOPIC.to_owned(),
            ],
        },
    );
    let (filters_tx, filters) = watch::channel(topic_filters(&config));
    let inbox_wake = Arc::new(Notify::new());
    let receiver = tokio::spawn(link.clone().run_receiver(
        eventloop,
        filters,
        Duration::from_secs(config.broker.max_backoff_secs),
        inbox_wake.clone(),
        mqtt_beat.clone(),
        shutdown.clone(),
    ));
    let publisher = tokio::spawn(link.clone().run_publisher(shutdown.clone()));
    let healer = tokio::spawn(slmd_store::heal(store.clone(), shutdown.clone()));
    let status = tokio::spawn(status::run_writer(
        config.state_dir(),
        store.clone(),
        link.clone(),
        notifier.clone(),
        shutdown.clone(),
    ));
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        log::info!("metrics: http://{addr}/metrics");
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            store.clone(),
            link.clone(),
            shutdown.clone(),
        ));
    }
    let (requests_tx, requests) = tokio::sync::mpsc::channel(1);
    let wake_link = link.clone();
    let routing = router::Routing::for_config(engine, &config);
    let control = control::Control {
        topic: config.updates.control_topic(&config.broker),
        status_topic: config.updates.status_topic(&config.broker),
        trust: config.updates.trust(),
        require_signed: config.updates.require_signed_requests,
        require_signed_injection: config.updates.require_signed_injection,
        device: config.broker.client_id.clone(),
        sequence: bundle::control::Sequence::open(&config.state_dir().join("bundles"))?,
        transfers: Arc::new(bundle::transfer::Transfers::open(
            &config.state_dir(),
            config.updates.transfer_bounds(),
        )?),
        reserved: reserved_topics(&config),
        tx: requests_tx,
    };
    let router = Arc::new(router::Router::new(
        store.clone(),
        routing,
        control,
        inbox_wake,
        Arc::new(move || wake_link.publisher_wake.notify_one()),
        metrics.clone(),
    ));
    let watchdog = notify::Notifier::watchdog_interval().map(|interval| {
        log::info!(
            "systemd watchdog: pinging every {} ms",
            interval.as_millis() / 2
        );
        let dog = notify::Watchdog {
            notifier: notifier.clone(),
            interval,
            router: router.clone(),
            mqtt: mqtt_beat,
        };
        tokio::spawn(dog.run(shutdown.clone()))
    });
    let stopping = {
        let (notifier, mut shutdown) = (notifier.clone(), shutdown.clone());
        tokio::spawn(async move {
            if shutdown.changed().await.is_ok() {
                notifier.send("STOPPING=1\nSTATUS=stopping: finishing messages in flight");
            }
        })
    };
    let reloader = tokio::spawn(
        supervisor::Supervisor {
            config: config.clone(),
            inference,
            router: router.clone(),
            filters: filters_tx,
            store: store.clone(),
            bundles,
            since: std::time::Instant::now(),
        }
        .run(reloads, requests),
    );
    log::info!(
        "slmd ready: {} task(s), broker {}:{}",
        config.tasks.len(),
        addr.host,
        addr.port
    );
    let routed = router.run(shutdown, Duration::from_secs(10)).await;
    let _ = receiver.await;
    let _ = publisher.await;
    let _ = status.await;
    healer.abort();
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    stopping.abort();
    reloader.abort();
    routed?;
    store.mark_stopped().await?;
    Ok(())
}

/// Test hook for the crash-loop rollback: `SLMD_FAULT_CRASH_ON_VERSION=V`
/// kills the daemon (SIGKILL) once a bundle of version V is loaded, as a
/// model that crashes the process would.
fn crash_if_asked(engine: &Engine) {
    if let Some(version) = &engine.model.version {
        slmd_core::fault::kill_if("SLMD_FAULT_CRASH_ON_VERSION", version);
    }
}
