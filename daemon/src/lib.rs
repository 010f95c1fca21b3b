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
//! llama.cpp model, heads, slots and the model store), [`slmd_core`]
//! (shared types). This crate is the daemon around them:
//!
//! - [`config`]: the TOML file, validated whole before anything starts.
//! - [`router`]: inbox to outbox: dedup, payload checks, task choice,
//!   results.
//! - [`payload`], [`hermes`]: slmd's own JSON and the Hermes protocol.
//! - [`policy`]: a task's safety rules (vehicle speed, quantities, refusals).
//! - [`injection`]: Hermes entity injection.
//! - [`monitor`]: factory-line anomaly notes: sensor windows, detectors,
//!   notes whose cause the model picks.
//! - [`supervisor`]: every engine change: reloads, injections, model
//!   updates, health checks, rollback.
//! - [`bundle`]: signed model bundles, their store, downloads, transfers,
//!   the canary.
//! - [`notify`]: systemd's notify socket and watchdog.
//! - [`metrics`], [`status`]: the Prometheus endpoint; `slmd status`.
//! - [`eval`]: `slmd eval` and `slmd bench`.
//! - [`logging`]: the journal or stderr.

pub mod answer;
pub mod bundle;
pub mod config;
pub mod control;
pub mod eval;
pub mod hermes;
pub mod injection;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod payload;
pub mod policy;
pub mod router;
pub mod status;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use config::Config;
use slmd_engine::models::{ModelError, ModelStore, PromptFormat};
use slmd_engine::{Engine, EngineError, EngineOptions, ModelInfo, TaskSpec};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    #[error(transparent)]
    Store(#[from] slmd_store::StoreError),
    #[error(transparent)]
    Examples(#[from] slmd_core::examples::ExamplesError),
    #[error(transparent)]
    Tls(#[from] slmd_link::TlsFileError),
    #[error(transparent)]
    Lock(#[from] slmd_store::lock::LockError),
    #[error(transparent)]
    Injection(#[from] injection::InjectionError),
    #[error(
        "model.mlock needs RLIMIT_MEMLOCK of at least {needed} bytes (the model file); the \
         limit is {limit}. Raise it (LimitMEMLOCK=infinity in the unit, ulimit -l) or set \
         model.mlock = false"
    )]
    Memlock { needed: u64, limit: String },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "model {name:?} is not installed in {store}: run `slmd model fetch {name} --config <this config>`"
    )]
    NotInstalled { name: String, store: PathBuf },
    #[error("cannot hash {path}: {source}")]
    Hash {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RunError {
    /// Whether the configuration is at fault, so that starting again
    /// cannot help: `slmd run` then exits 78 (EX_CONFIG), which the
    /// systemd unit does not restart on. A model the configuration names
    /// that is missing, unreadable or not installed, an examples or TLS
    /// file that cannot be read, and an mlock the limits cannot grant are;
    /// a busy state directory, a damaged store or a failed load are not.
    pub fn is_config(&self) -> bool {
        match self {
            RunError::Model(e) => matches!(
                e,
                ModelError::ManifestNotFound { .. }
                    | ModelError::ManifestRead { .. }
                    | ModelError::ManifestParse { .. }
                    | ModelError::ManifestInvalid { .. }
            ),
            RunError::Examples(_)
            | RunError::Tls(_)
            | RunError::NotInstalled { .. }
            | RunError::Hash { .. }
            | RunError::Memlock { .. } => true,
            RunError::Engine(_)
            | RunError::Bundle(_)
            | RunError::Store(_)
            | RunError::Lock(_)
            | RunError::Injection(_)
            | RunError::Metrics { .. } => false,
        }
    }
}

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
        match slmd_engine::models::find_manifest(&manifests, name) {
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

/// The model to serve: the active bundle's, else the one `[model]` names.
pub fn resolve_model(config: &Config) -> Result<(PathBuf, ModelInfo, PromptFormat), RunError> {
    let store = bundle::store::BundleStore::open(&config.state_dir())?;
    if let Some(b) = store.active()? {
        return Ok(bundle_model(&b));
    }
    configured_model(config)
}

/// How the engine names and prompts an installed bundle's model.
pub fn bundle_model(b: &bundle::store::Installed) -> (PathBuf, ModelInfo, PromptFormat) {
    let info = ModelInfo {
        name: b.manifest.name.clone(),
        sha256: b.manifest.model_sha256.clone(),
        version: Some(b.manifest.version.clone()),
    };
    (b.model(), info, b.manifest.prompt_format)
}

/// The model `[model]` names (used while no bundle is active).
pub fn configured_model(config: &Config) -> Result<(PathBuf, ModelInfo, PromptFormat), RunError> {
    match &config.model.path {
        Some(path) => locate_model(ModelRef::Path(config.resolve(path))),
        None => locate_model(ModelRef::Name {
            name: config.model.name.as_deref().unwrap_or_default(),
            state_dir: config.state_dir(),
            manifests: config.resolve(&config.model.manifests),
        }),
    }
}

/// A model named by the user: a GGUF file, or a manifest name installed in
/// the model store.
pub enum ModelRef<'a> {
    Path(PathBuf),
    Name {
        name: &'a str,
        state_dir: PathBuf,
        manifests: PathBuf,
    },
}

pub fn locate_model(r: ModelRef<'_>) -> Result<(PathBuf, ModelInfo, PromptFormat), RunError> {
    match r {
        ModelRef::Path(path) => {
            let sha256 =
                slmd_engine::models::sha256_file(&path).map_err(|source| RunError::Hash {
                    path: path.clone(),
                    source,
                })?;
            let name = path
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
            let info = ModelInfo {
                name,
                sha256,
                version: None,
            };
            Ok((path, info, PromptFormat::Chatml))
        }
        ModelRef::Name {
            name,
            state_dir,
            manifests,
        } => {
            let manifest = slmd_engine::models::find_manifest(&manifests, name)?;
            let store = ModelStore::open(&state_dir)?;
            let path = store
                .installed(&manifest)
                .ok_or_else(|| RunError::NotInstalled {
                    name: name.to_owned(),
                    store: store.path_for(&manifest),
                })?;
            let info = ModelInfo {
                name: manifest.name.clone(),
                sha256: manifest.sha256.clone(),
                version: None,
            };
            Ok((path, info, manifest.prompt_format))
        }
    }
}

/// Loads the model and trains every task's head (blocking; seconds).
pub fn start_engine(config: &Config) -> Result<Engine, RunError> {
    start_engine_with(config, resolve_model(config)?)
}

/// [`start_engine`] with a given model.
pub fn start_engine_with(
    config: &Config,
    (model_path, model, format): (PathBuf, ModelInfo, PromptFormat),
) -> Result<Engine, RunError> {
    // Entities injected at run time (Hermes) extend or replace the
    // configuration's enum values.
    let config = &injection::Injected::load(&config.state_dir())?.apply(config);
    let tasks = config
        .tasks
        .iter()
        .map(|t| task_spec(config, t))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = EngineOptions {
        model_path,
        model,
        format,
        context_size: config.model.context_size,
        threads: config.model.threads,
        queue: config.limits.max_in_flight * 2,
        head_cache: Some(config.state_dir().join("heads")),
        decode: Default::default(),
        extract_context: config.model.extract_context_size,
        head_depth: config.model.head_depth,
        head_requantize: config.model.head_requantize,
        tuning: slmd_engine::Tuning {
            mlock: config.model.mlock,
            nice: config.model.nice,
            cpus: config.model.cpus.clone(),
        },
    };
    if opts.tuning.mlock {
        check_memlock(&opts.model_path)?;
    }
    Ok(Engine::start(opts, tasks)?)
}

/// `model.mlock` needs RLIMIT_MEMLOCK to cover the model file; say so
/// before llama.cpp fails (or silently does not lock).
fn check_memlock(model: &Path) -> Result<(), RunError> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let needed = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| RunError::Memlock {
        needed,
        limit: format!("unknown ({e})"),
    })?;
    // rlim_t is 32 bits on 32-bit Arm glibc and 64 elsewhere: compare wide.
    if soft != RLIM_INFINITY && u128::from(soft) < u128::from(needed) {
        return Err(RunError::Memlock {
            needed,
            limit: format!("{soft} bytes"),
        });
    }
    Ok(())
}

/// What the engine needs to know about a configured task (monitor tasks
/// are classify tasks to it: their labels are the cause categories).
pub fn task_spec(config: &Config, t: &config::TaskConfig) -> Result<TaskSpec, RunError> {
    Ok(TaskSpec {
        name: t.name.clone(),
        strategy: t.strategy,
        instruction: t.instruction.clone(),
        cue: t.cue.clone(),
        labels: t.labels.iter().map(|l| l.name.clone()).collect(),
        examples: config.examples_of(t)?,
        lexical_weight: t.lexical_weight,
        concept_weight: t.concept_weight,
        concepts: t.concepts.as_ref().map(Into::into).unwrap_or_default(),
        abstain_below: t.abstain_below,
        reject_label: t.reject_label.clone(),
        extract: (t.kind == config::TaskKind::Extract).then(|| slmd_engine::ExtractSpec {
            slots: t.slots.clone(),
            instruction: t.slot_instruction.clone(),
            label_slots: t.labels.iter().map(|l| l.slots.clone()).collect(),
        }),
    })
}

/// Whether messages go through the model (always, but for measuring the
/// message path alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inference {
    Model,
    /// [`Engine::trivial`]: the first label of the task, at once.
    Skipped,
}

/// Starts an engine for `config`'s tasks (blocking work off the runtime).
pub(crate) async fn build_engine(
    config: &Config,
    inference: Inference,
) -> Result<Engine, RunError> {
    match inference {
        Inference::Model => {
            let config = config.clone();
            tokio::task::spawn_blocking(move || start_engine(&config))
                .await
                .map_err(|e| EngineError::Backend(e.to_string()))?
        }
        Inference::Skipped => {
            log::warn!("--no-inference: every result is the task's first label, not a model's");
            let tasks: Vec<_> = config
                .tasks
                .iter()
                .map(|t| {
                    let labels = t.labels.iter().map(|l| l.name.clone()).collect();
                    (t.name.clone(), labels)
                })
                .collect();
            Ok(Engine::trivial(&tasks))
        }
    }
}

/// Every task's input topics, the model update control topic, when a task
/// speaks Hermes its entity injection topic, and the policies' vehicle
/// state topics.
pub(crate) fn topic_filters(config: &Config) -> Vec<String> {
    let control = config.updates.control_topic(&config.broker);
    let hermes = config
        .tasks
        .iter()
        .any(|t| t.protocol == config::Protocol::Hermes);
    let all = config
        .tasks
        .iter()
        .flat_map(|t| t.topics.iter().cloned())
        .chain(std::iter::once(control))
        .chain(hermes.then(|| injection::PERFORM_TOPIC.to_owned()))
        .chain(
            config
                .tasks
                .iter()
                .filter_map(|t| t.policy.as_ref()?.state_topic.clone()),
        );
    let mut filters: Vec<String> = Vec::new();
    for f in all {
        if !filters.contains(&f) {
            filters.push(f);
        }
    }
    filters
}

/// Runs the daemon until `shutdown` turns true; applies the configurations
/// sent on `reloads` (SIGHUP) while it runs.
/// Topics an MQTT 5 response topic may never name, whatever
/// `limits.response_topics` allows: slmd's own control, status,
/// injection and dead-letter topics (input topics are checked per task).
fn reserved_topics(config: &Config) -> Vec<String> {
    vec![
        config.updates.control_topic(&config.broker),
        config.updates.status_topic(&config.broker),
        config.broker.status_topic(),
        config.limits.dead_letter_topic.clone(),
        "hermes/injection/#".to_owned(),
        "hermes/error/#".to_owned(),
        format!("slmd/{}/#", config.broker.client_id),
    ]
}

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
                notifier.send("EXTEND_TIMEOUT_USEC=30000000\nSTATUS=loading the model");
                tokio::time::sleep(Duration::from_secs(10)).await;
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
    let routing = router::Routing::new(engine, config.tasks.clone(), config.limits.clone());
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
            bundle::transfer::Bounds::of(&config.updates),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlock_is_refused_when_the_memlock_limit_is_below_the_model() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8 << 20).unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap();
        setrlimit(Resource::RLIMIT_MEMLOCK, (64 << 10).min(hard), hard).unwrap();
        let refused = check_memlock(file.path());
        setrlimit(Resource::RLIMIT_MEMLOCK, soft, hard).unwrap();
        let err = refused.expect_err("the limit is below the model's size");
        assert!(err.to_string().contains("LimitMEMLOCK"), "{err}");
        assert!(check_memlock(Path::new("/dev/null")).is_ok());
    }

    #[test]
    fn a_configured_task_counts_its_own_concepts_or_the_built_in_ones() {
        use config::tests::config;
        let own = config("kind = \"classify\"\nconcepts = { aus = [\"aus\"], an = [\"an\"] }");
        let spec = task_spec(&own, &own.tasks[0]).unwrap();
        let names: Vec<&str> = spec
            .concepts
            .groups()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["an", "aus"]);
        assert_eq!(spec.concept_weight, config::default_concept_weight());
        let built_in = config("kind = \"classify\"\nconcept_weight = 0.5");
        let spec = task_spec(&built_in, &built_in.tasks[0]).unwrap();
        assert_eq!(spec.concepts, slmd_engine::concepts::Concepts::default());
        assert_eq!(spec.concept_weight, 0.5);
    }
}
