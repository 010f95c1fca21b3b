//! One update from start to end, as `slmd model install` and the daemon's
//! control topic run it: fetch, verify, install, canary, switch the pointer,
//! collect old bundles. Every outcome is recorded in the pointer's `last`
//! attempt (published retained on the model status topic by the daemon).

use serde::Serialize;

use crate::config::Config;
use slmd_engine::Engine;

use crate::bundle::canary::{self, Gate, Report};
use crate::bundle::store::{install_file, BundleStore, Installed};
use crate::bundle::{fault, source, BundleError, SIGNATURE};

/// What to do with a source.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub source: String,
    /// Run the canary and make it active.
    pub activate: bool,
    /// Accept an older version than the active one.
    pub force: bool,
    /// Set when the request came over MQTT: the source is held to the
    /// `[updates]` rules for network sources, and a download stops at
    /// this size (the request's declared size, else `max_bundle_bytes`).
    pub network: Option<u64>,
}

/// How an update ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub name: String,
    pub version: String,
    pub signed: bool,
    pub activated: bool,
    pub canary: Option<Report>,
}

/// Fetches, verifies and installs `req.source` (blocking). The store's lock
/// is held throughout.
pub fn install(
    config: &Config,
    store: &BundleStore,
    req: &Request,
) -> Result<Installed, BundleError> {
    let u = &config.updates;
    if req.network.is_some() {
        source::Network {
            url_prefixes: u.url_prefixes.clone(),
            source_dir: u.source_dir.as_ref().map(|d| config.resolve(d)),
        }
        .check(&req.source)?;
    }
    let _lock = store.lock()?;
    // What the file system can take beside the reserve, and what the
    // request allows.
    let free = crate::bundle::store::free_bytes(store.root())?.saturating_sub(u.reserve_bytes);
    let limit = req
        .network
        .map_or(u64::MAX, |declared| declared.min(u.max_bundle_bytes))
        .min(free);
    let fetched = source::fetch(&req.source, &store.staging(), limit, req.network.is_some())?;
    let result = install_file(store, &fetched.path, &u.trust(), req.force, u.reserve_bytes);
    // A download is deleted whatever became of it (installing unpacks a
    // copy).
    if fetched.downloaded {
        let _ = std::fs::remove_file(&fetched.path);
    }
    result
}

/// The canary for `bundle`: its model loaded beside whatever runs, the
/// golden examples answered (blocking). Without `canary_examples` every
/// task answers one text of its own examples; no accuracy is asked.
pub fn canary(config: &Config, bundle: &Installed) -> Result<(Engine, Report), BundleError> {
    let engine = crate::serving::start_engine_with(config, crate::serving::bundle_model(bundle))
        .map_err(|e| BundleError::Canary(format!("the model does not start: {e}")))?;
    let report = check(config, &engine)?;
    fault("canary");
    Ok((engine, report))
}

/// Runs the configured golden examples (or a smoke set) through `engine`.
pub fn check(config: &Config, engine: &Engine) -> Result<Report, BundleError> {
    let u = &config.updates;
    let (golden, gate) = match &u.canary_examples {
        Some(path) => (
            canary::load(&config.resolve(path))?,
            Gate {
                min_accuracy: u.canary_min_accuracy,
                max_p95_ms: u.canary_max_p95_ms,
            },
        ),
        None => (
            smoke(config),
            Gate {
                min_accuracy: 0.0,
                max_p95_ms: u.canary_max_p95_ms,
            },
        ),
    };
    Ok(canary::run(engine, &golden, gate))
}

/// One text per task (its first label's name) when no golden set exists:
/// proves the model loads and answers every task.
fn smoke(config: &Config) -> Vec<canary::Golden> {
    config
        .tasks
        .iter()
        .filter_map(|t| {
            let l = t.labels.first()?;
            Some(canary::Golden {
                task: t.name.clone(),
                text: l.name.replace('_', " "),
                label: l.name.clone(),
            })
        })
        .collect()
}

/// Canary then activation of an installed bundle (blocking). A failed
/// canary leaves the active bundle as it is and is recorded. Returns the
/// canary's engine, which can serve at once.
pub fn activate(
    config: &Config,
    store: &BundleStore,
    bundle: &Installed,
) -> Result<(Report, Engine), BundleError> {
    let version = bundle.manifest.version.as_str();
    let (engine, report) = match canary(config, bundle) {
        Ok(r) => r,
        Err(e) => {
            store.record(Some(version), "refused", &e.to_string())?;
            return Err(e);
        }
    };
    if !report.passed {
        store.record(
            Some(version),
            "refused",
            &format!("canary: {}", report.reason),
        )?;
        return Err(BundleError::Canary(report.reason));
    }
    switch(config, store, bundle)?;
    Ok((report, engine))
}

/// Switches the pointer to `bundle` and collects bundles no longer kept.
pub fn switch(config: &Config, store: &BundleStore, bundle: &Installed) -> Result<(), BundleError> {
    let _lock = store.lock()?;
    store.activate(&bundle.id, &bundle.manifest.version)?;
    fault("activated");
    for id in store.collect(config.updates.keep)? {
        log::info!("model update: removed bundle {id} (no longer kept for rollback)");
    }
    Ok(())
}

/// Install, and with `req.activate` canary and activation: the whole
/// update, recording a refusal in the pointer. An activated bundle comes
/// with its (canary-tested) engine.
pub fn run(
    config: &Config,
    store: &BundleStore,
    req: &Request,
) -> Result<(Outcome, Option<Engine>), BundleError> {
    let installed = match install(config, store, req) {
        Ok(b) => b,
        Err(e) => {
            let _ = store.record(None, "refused", &format!("{}: {e}", e.reason()));
            return Err(e);
        }
    };
    let signed = installed.dir.join(SIGNATURE).exists();
    let mut outcome = Outcome {
        id: installed.id.clone(),
        name: installed.manifest.name.clone(),
        version: installed.manifest.version.clone(),
        signed,
        activated: false,
        canary: None,
    };
    if !req.activate {
        store.record(Some(&outcome.version), "installed", "")?;
        return Ok((outcome, None));
    }
    let (report, engine) = activate(config, store, &installed)?;
    outcome.canary = Some(report);
    outcome.activated = true;
    Ok((outcome, Some(engine)))
}
