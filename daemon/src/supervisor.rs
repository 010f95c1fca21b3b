//! Which engine serves, and when that changes: configuration reloads
//! (SIGHUP), model updates (the control topic, or a pointer switched by
//! `slmd model install --activate` / `activate` / `rollback` followed by
//! SIGHUP), the trial of a new bundle and automatic rollback.
//!
//! One task owns every engine change, so a reload and an update never race.
//! A new engine starts beside the running one; the router takes it between
//! messages (messages in flight finish on the old one, which is dropped
//! with the last of them). A new model must first pass the health check
//! (the canary's golden examples, on the engine that will serve); if it
//! does not, the pointer is rolled back and the old engine keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::bundle::store::BundleStore;
use crate::config::Config;
use crate::control::Job;
use crate::injection::{self, Injected};
use crate::router::{Router, Routing};
use crate::serving::{build_engine, topic_filters, Inference};
use crate::update;
use slmd_engine::{Engine, ModelInfo};
use slmd_store::{OutboxEntry, Store};

pub struct Supervisor {
    pub config: Config,
    pub inference: Inference,
    pub router: Arc<Router>,
    pub filters: watch::Sender<Vec<String>>,
    pub store: Store,
    pub bundles: BundleStore,
    /// When the running engine started serving (the trial clock).
    pub since: Instant,
}

impl Supervisor {
    /// Runs until both channels close.
    pub async fn run(
        mut self,
        mut reloads: mpsc::Receiver<Config>,
        mut requests: mpsc::Receiver<Job>,
    ) {
        self.publish_status("idle", None);
        let mut trial = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                Some(new) = reloads.recv() => self.reload(new).await,
                Some(job) = requests.recv() => match job {
                    Job::Update { req, transfer } => self.update(req, transfer).await,
                    Job::Inject(req) => self.inject(req).await,
                },
                _ = trial.tick() => self.confirm_trial(),
                else => break,
            }
        }
    }

    /// A new configuration; `[broker]`, `[state]`, `[model]`, `[metrics]`
    /// keep their running values. Also switches to the bundle the pointer
    /// names if that is not the running one.
    async fn reload(&mut self, new: Config) {
        let current = &self.config;
        let fixed = [
            ("broker", new.broker != current.broker),
            ("state", new.state != current.state),
            ("model", new.model != current.model),
            ("metrics", new.metrics != current.metrics),
        ];
        for (section, changed) in fixed {
            if changed {
                log::warn!("reload: changes to [{section}] take effect at the next restart");
            }
        }
        let next = Config {
            broker: current.broker.clone(),
            state: current.state.clone(),
            model: current.model.clone(),
            metrics: current.metrics.clone(),
            ..new
        };
        match self.switch(&next).await {
            Ok(()) => {
                let _ = self.filters.send(topic_filters(&next));
                log::info!("configuration reloaded: {} task(s)", next.tasks.len());
                self.config = next;
            }
            Err(e) => log::error!("reload refused: {e}; keeping the running configuration"),
        }
    }

    /// Starts an engine for `config` and the model the pointer names; when
    /// the model changed it must pass the health check first, else the
    /// pointer is rolled back. Then the router takes it.
    async fn switch(&mut self, config: &Config) -> Result<(), String> {
        let running = self.router.routing().engine.model.clone();
        let engine = build_engine(config, self.inference)
            .await
            .map_err(|e| e.to_string())?;
        let changed = engine.model != running && self.inference == Inference::Model;
        if changed {
            let checked = {
                let (config, engine) = (config.clone(), engine.clone());
                tokio::task::spawn_blocking(move || update::check(&config, &engine)).await
            };
            let report = match checked {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(self.roll_back(&format!("health check: {e}"))),
                Err(e) => return Err(self.roll_back(&format!("health check: {e}"))),
            };
            if !report.passed {
                return Err(self.roll_back(&format!("health check: {}", report.reason)));
            }
            log::info!(
                "model switched: {} {} ({}; health check {} of {} in {:.1} s)",
                engine.model.name,
                engine.model.version.as_deref().unwrap_or("-"),
                engine.model.sha256,
                report.correct,
                report.examples,
                report.seconds
            );
            self.since = Instant::now();
        }
        self.router.replace(Routing::for_config(engine, config));
        if changed {
            self.publish_status("idle", None);
        }
        Ok(())
    }

    fn roll_back(&mut self, why: &str) -> String {
        log::error!("the new model failed after activation ({why}); rolling back");
        let done = self
            .bundles
            .lock()
            .and_then(|_lock| self.bundles.rollback(why));
        if let Err(e) = done {
            log::error!("rollback: {e}");
        }
        self.publish_status("idle", None);
        why.to_owned()
    }

    /// One request from the control topic: install (and usually activate)
    /// on a blocking thread, then switch engines.
    async fn update(&mut self, req: update::Request, transfer: Option<String>) {
        log::info!("model update requested: {}", req.source);
        self.publish_status("updating", Some(&req.source));
        let job = {
            let config = self.config.clone();
            let bundles = self.bundles.clone();
            let transfers = self.router.control.transfers.clone();
            tokio::task::spawn_blocking(move || {
                let result = update::run(&config, &bundles, &req);
                if let Some(id) = transfer {
                    transfers.finish(&id);
                }
                result
            })
        };
        match job.await {
            Ok(Ok((outcome, Some(engine)))) => {
                log::info!(
                    "model update: {} {} passed its canary and serves now",
                    outcome.name,
                    outcome.version
                );
                self.router
                    .replace(Routing::for_config(engine, &self.config));
                self.since = Instant::now();
            }
            Ok(Ok((outcome, None))) => log::info!("model update: installed {}", outcome.version),
            Ok(Err(e)) => log::error!(reason = e.reason(); "model update refused: {e}"),
            Err(e) => log::error!("model update: {e}"),
        }
        self.publish_status("idle", None);
    }

    /// Records the injected values (`<state>/injections.json`) and swaps in
    /// an engine built with them; if that fails the file is put back.
    /// Answered on `hermes/injection/complete` or `hermes/error/injection`.
    async fn inject(&mut self, req: injection::Request) {
        let dir = self.config.state_dir();
        let recorded = {
            let (config, req, dir) = (self.config.clone(), req.clone(), dir.clone());
            tokio::task::spawn_blocking(move || {
                let mut injected = Injected::load(&dir)?;
                let before = injected.clone();
                injected.perform(&req, &config)?;
                injected.save(&dir)?;
                Ok::<_, injection::InjectionError>(before)
            })
            .await
            .expect("injection task does not panic")
        };
        let outcome = match recorded {
            Err(e) => Err((e.reason(), e.to_string())),
            Ok(before) => {
                let config = self.config.clone();
                match self.switch(&config).await {
                    Ok(()) => Ok(()),
                    Err(why) => {
                        let put_back = tokio::task::spawn_blocking(move || before.save(&dir));
                        if let Ok(Err(e)) = put_back.await {
                            log::error!(
                                "entity injection: cannot restore the previous values: {e}"
                            );
                        }
                        Err(("engine", why))
                    }
                }
            }
        };
        let (topic, body) = match outcome {
            Ok(()) => {
                log::info!("entities injected; the engine serves with them");
                (injection::COMPLETE_TOPIC, json!({"requestId": req.id}))
            }
            Err((reason, why)) => {
                log::warn!(reason = reason; "entity injection refused: {why}");
                let body = injection::refusal(req.id.as_deref(), reason, &why);
                (injection::ERROR_TOPIC, body)
            }
        };
        self.publish(topic, &body, false);
    }

    /// A bundle on trial that has served `trial_secs` is confirmed.
    fn confirm_trial(&mut self) {
        let Ok(p) = self.bundles.pointer() else {
            return;
        };
        let Some(trial) = p.trial else { return };
        if self.since.elapsed() < Duration::from_secs(self.config.updates.trial_secs) {
            return;
        }
        let serving = self.router.routing().engine.model.clone();
        let Ok(b) = self.bundles.get(&trial.id) else {
            return;
        };
        if serving.sha256 != b.manifest.model_sha256
            || serving.version.as_deref() != Some(b.manifest.version.as_str())
        {
            return;
        }
        if let Ok(true) = self.bundles.confirm(&trial.id) {
            log::info!(
                "model {} {} ran healthy for {} s: trial over",
                b.manifest.name,
                b.manifest.version,
                self.config.updates.trial_secs
            );
            self.publish_status("idle", None);
        }
    }

    /// The retained model status: what serves, what the pointer says, the
    /// last attempt.
    fn publish_status(&self, state: &str, source: Option<&str>) {
        let serving: ModelInfo = self.router.routing().engine.model.clone();
        let pointer = self.bundles.pointer().unwrap_or_default();
        let status = json!({
            "state": state,
            "source": source,
            "serving": serving,
            "active_bundle": pointer.active,
            "on_trial": pointer.trial.is_some(),
            "last": pointer.last,
        });
        let topic = self.config.updates.status_topic(&self.config.broker);
        self.publish(&topic, &status, true);
    }

    fn publish(&self, topic: &str, body: &serde_json::Value, retain: bool) {
        let entry = OutboxEntry {
            topic: topic.to_owned(),
            correlation: None,
            payload: serde_json::to_vec(body).expect("JSON serialises"),
            retain,
        };
        match self.store.publish(&entry) {
            Ok(()) => self.router.outbox_wake.as_ref()(),
            Err(e) => log::error!("cannot queue a message for {topic}: {e}"),
        }
    }
}

/// What the engine serving now is, for logs.
pub fn describe(engine: &Engine) -> String {
    let m = &engine.model;
    match &m.version {
        Some(v) => format!("bundle {} {v}", m.name),
        None => format!("model {}", m.name),
    }
}
