//! From a configuration to a running engine: which model serves (the
//! active bundle's, else the one `[model]` names), what the engine is told
//! about each task, and the topics the daemon subscribes to for them.

use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::error::RunError;
use crate::{bundle, injection};
use slmd_engine::models::{ModelStore, PromptFormat};
use slmd_engine::{Engine, EngineError, EngineOptions, ModelInfo, TaskSpec};

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
            let manifest =
                slmd_engine::models::find_kind(&manifests, name, slmd_engine::models::Kind::Model)?;
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

/// What the engine being started is doing (systemd's `STATUS=` while the
/// daemon starts).
pub static STARTING: std::sync::LazyLock<slmd_engine::Progress> =
    std::sync::LazyLock::new(Default::default);

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
        generate_requantize: config.model.generate_requantize,
        tuning: slmd_engine::Tuning {
            mlock: config.model.mlock,
            nice: config.model.nice,
            cpus: config.model.cpus.clone(),
        },
        progress: STARTING.clone(),
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
    let mut spec = task_spec_without_samples(config, t)?;
    let wanted = match &t.kind {
        config::TaskKind::Extract(e) => e.templates.as_ref().map_or(0, |tc| tc.train_samples),
        _ => 0,
    };
    if let Some(stage) = spec.templates.as_ref().filter(|_| wanted > 0) {
        let labels = &spec.labels;
        let samples: Vec<_> = stage
            .samples(wanted, 1)
            .into_iter()
            .filter(|s| labels.contains(&s.intent))
            .map(|s| slmd_core::examples::Example {
                text: s.text,
                label: s.intent,
                slots: None,
            })
            .collect();
        log::info!(
            "task {}: {} sentence(s) written from the templates join its examples",
            t.name,
            samples.len()
        );
        spec.examples.extend(samples);
    }
    Ok(spec)
}

fn task_spec_without_samples(
    config: &Config,
    t: &config::TaskConfig,
) -> Result<TaskSpec, RunError> {
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
        novelty_quantile: t.novelty_quantile,
        extract: match &t.kind {
            config::TaskKind::Extract(e) => Some(slmd_engine::ExtractSpec {
                slots: e.slots.clone(),
                instruction: e.slot_instruction.clone(),
                label_slots: t.labels.iter().map(|l| l.slots.clone()).collect(),
            }),
            _ => None,
        },
        templates: match &t.kind {
            config::TaskKind::Extract(e) => e
                .templates
                .as_ref()
                .map(|tc| template_stage(config, tc, &e.slots))
                .transpose()?,
            _ => None,
        },
    })
}

/// An extract task's template stage: its sources compiled with its home
/// (paths relative to the configuration file).
pub fn template_stage(
    config: &Config,
    tc: &config::TemplatesConfig,
    slots: &[slmd_engine::schema::SlotSpec],
) -> Result<slmd_engine::TemplateStage, RunError> {
    let resolved = config::TemplatesConfig {
        sources: tc
            .sources
            .iter()
            .map(|s| {
                let path = config.resolve(Path::new(s));
                match path.exists() {
                    true => path.display().to_string(),
                    false => s.clone(),
                }
            })
            .collect(),
        home: tc.home.as_ref().map(|h| config.resolve(h)),
        model_stage: tc.model_stage,
        labels: tc.labels.clone(),
        train_samples: tc.train_samples,
    };
    let manifests = config.resolve(&config.model.manifests);
    template_stage_in(&config.state_dir(), &manifests, &resolved, slots)
}

/// [`template_stage`] with the model store and manifests given; a source
/// that is not a file or folder is a templates manifest's name.
pub fn template_stage_in(
    state_dir: &Path,
    manifests: &Path,
    tc: &config::TemplatesConfig,
    slots: &[slmd_engine::schema::SlotSpec],
) -> Result<slmd_engine::TemplateStage, RunError> {
    use slmd_templates::{Home, TemplateError};
    let mut sources = slmd_templates::Sources::default();
    for source in &tc.sources {
        let path = Path::new(source);
        if path.exists() {
            sources.add_path(path)?;
            continue;
        }
        let m = slmd_engine::models::find_kind(
            manifests,
            source,
            slmd_engine::models::Kind::Templates,
        )?;
        let installed =
            ModelStore::installed_in(state_dir, &m).ok_or_else(|| RunError::NotInstalled {
                name: source.to_owned(),
                store: state_dir.join("models"),
            })?;
        sources.add_path(&installed)?;
    }
    let mut home = match &tc.home {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| TemplateError::Read {
                path: path.display().to_string(),
                source: e,
            })?;
            Home::from_fixtures(&text).map_err(|e| TemplateError::Format {
                path: path.display().to_string(),
                why: e.to_string(),
            })?
        }
        None => Home::default(),
    };
    for s in slots {
        if let slmd_engine::schema::SlotKind::Enum { values, .. } = &s.kind {
            home.add_names(&s.name, values);
        }
    }
    let started = std::time::Instant::now();
    let templates = sources.compile(&home)?;
    log::info!(
        "{} template sentence(s) compiled in {} ms",
        templates.len(),
        started.elapsed().as_millis()
    );
    Ok(slmd_engine::TemplateStage {
        templates: std::sync::Arc::new(templates),
        model_stage: tc.model_stage,
        labels: tc.labels.clone(),
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
        )
        .chain(
            config
                .tasks
                .iter()
                .filter_map(|t| t.escalate.as_ref()?.reply_topic.clone()),
        );
    let mut filters: Vec<String> = Vec::new();
    for f in all {
        if !filters.contains(&f) {
            filters.push(f);
        }
    }
    filters
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
