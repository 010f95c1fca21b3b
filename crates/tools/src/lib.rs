//! `slmd eval | bench | replay`: the tools for measuring and demonstrating
//! slmd. The `slmd` binary carries them with its `tools` feature (on by
//! default; a device build leaves them out: `--no-default-features`).
//!
//! - [`eval`]: accuracy, slot F1, calibration and latency on labelled rows
//!   (k-fold or a held-out file), and the monitor's anomaly scoring;
//! - [`eval::bench`]: latency and throughput through the engine;
//! - [`replay`]: publishing a recorded sensor file as readings.

pub mod eval;
pub mod replay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use slmd::cli::{dirs, load, DirArgs};

#[derive(Subcommand)]
pub enum ToolCommand {
    /// Evaluate classification on labelled JSONL rows and print the report.
    ///
    /// `--train A --test B`: train on A, test on B. `--train A --cv K`:
    /// K-fold cross-validation on A. `--config FILE --task NAME --test B`:
    /// test a configured task on B.
    Eval(Box<EvalArgs>),
    /// Latency and throughput through the engine at several concurrencies,
    /// with and without prefix caching and batching.
    Bench(BenchArgs),
    /// Publish a recorded sensor file (CSV with a header: a time stamp
    /// column and value columns) as readings, for demos and tests.
    Replay {
        /// CSV: `timestamp,value` (the NAB layout) or `ts,<sensor>,<sensor>...`.
        file: PathBuf,
        /// Topic to publish the readings on.
        #[arg(long)]
        topic: String,
        /// Readings per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// The broker, HOST:PORT (or mqtt://HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: slmd_link::BrokerAddr,
        /// Sensor name of a lone `value` column (default: the file's stem).
        #[arg(long)]
        sensor: Option<String>,
        /// Unit put in every reading.
        #[arg(long)]
        unit: Option<String>,
    },
}

/// A share between 0 and 1.
fn quantile(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(q) if (0.0..=1.0).contains(&q) => Ok(q),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

impl ToolCommand {
    /// Eval prints its progress unless its output is JSON; the rest only
    /// warn.
    pub fn log_level(&self) -> log::LevelFilter {
        match self {
            ToolCommand::Eval(a) if !a.json && a.kind != EvalKind::Anomaly => {
                log::LevelFilter::Info
            }
            _ => log::LevelFilter::Warn,
        }
    }
}

pub fn run(cmd: ToolCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ToolCommand::Eval(args) => eval(*args),
        ToolCommand::Bench(args) => bench(args),
        ToolCommand::Replay {
            file,
            topic,
            rate,
            broker,
            sensor,
            unit,
        } => {
            if !(rate.is_finite() && rate > 0.0) {
                anyhow::bail!("--rate must be above 0");
            }
            slmd_core::topic::check_name(&topic)
                .map_err(|why| anyhow::anyhow!("--topic: {why}"))?;
            let rows = crate::replay::read(&file, sensor.as_deref())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let opts = crate::replay::Options {
                host: &broker.host,
                port: broker.port,
                topic: &topic,
                rate,
                unit: unit.as_deref(),
                ack_timeout: std::time::Duration::from_secs(30),
            };
            let sent = runtime.block_on(crate::replay::publish(&rows, &opts))?;
            println!(
                "{}: {sent} readings published to {topic} and acknowledged",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Labelled rows to train on (or to cross-validate with --cv).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Labelled rows to test on.
    #[arg(long)]
    test: Option<PathBuf>,
    /// K-fold stratified cross-validation on the --train file.
    #[arg(long)]
    cv: Option<usize>,
    /// Evaluate this configured task (with --config and --test).
    #[arg(long)]
    task: Option<String>,
    /// `extract` also generates each recognised intent's slots (schema
    /// from the training rows' `slots`) and reports slot P/R/F1.
    #[arg(long, value_enum, default_value = "classify")]
    kind: EvalKind,
    /// Extract: known slot values, YAML or JSON: a map of slot name to
    /// values, or a Home Assistant fixtures file (areas, floors, entities).
    #[arg(long)]
    slot_values: Option<PathBuf>,
    /// More training rows for every task, never tested: labelled JSONL or a
    /// Home Assistant intent catalogue (`intents.yaml`: its example
    /// sentences; with --kind extract each intent may also fill the slots
    /// the catalogue lists for it). Rows whose text is also in --train or
    /// --test are dropped.
    #[arg(long)]
    extra_train: Option<PathBuf>,
    /// Extract: what the model is told before an intent's examples.
    #[arg(long, default_value = slmd_engine::extract::DEFAULT_INSTRUCTION)]
    slot_instruction: String,
    /// Anomaly: a labelled series (CSV as `slmd replay` reads) to score the
    /// detector grid on, with --faults.
    #[arg(long)]
    series: Option<PathBuf>,
    /// Anomaly: the series' fault intervals, CSV `kind,start,end`.
    #[arg(long)]
    faults: Option<PathBuf>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Also write every row's outcome (text, truth, prediction, confidence,
    /// slots, latency) to this file, one JSON object per line.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Fold assignment seed. Several (`--seed 1,2,3,4`) repeat the
    /// cross-validation once per seed: the report pools every seed's rows
    /// (accuracy is then the seeds' mean) and lists each seed's scores.
    #[arg(long, value_delimiter = ',', default_value = "1", num_args = 1..)]
    seed: Vec<u64>,
    /// How labels are chosen.
    #[arg(long, value_enum, default_value = "head")]
    strategy: slmd_engine::Strategy,
    #[arg(long, default_value_t = slmd::config::default_instruction())]
    instruction: String,
    /// Words after the input (see the task option `cue`).
    #[arg(long, default_value_t = slmd::config::default_cue())]
    cue: String,
    #[arg(long, default_value_t = slmd::config::default_lexical_weight())]
    lexical_weight: f32,
    /// Weight of the built-in command concepts (see the task option
    /// `concept_weight`; 0 turns them off).
    #[arg(long, default_value_t = slmd::config::default_concept_weight())]
    concept_weight: f32,
    #[arg(long, default_value_t = 0.0)]
    abstain_below: f32,
    /// A label that means out of scope (e.g. `oos`): predicting it rejects.
    #[arg(long)]
    reject_label: Option<String>,
    /// Inputs less like the examples than this share of the examples are
    /// not recognised (see the task option `novelty_quantile`; 0 off).
    #[arg(long, default_value_t = slmd_engine::NOVELTY_QUANTILE, value_parser = quantile)]
    novelty_quantile: f32,
    /// With --cv and --reject-label: never train on out-of-scope rows, so
    /// each fold tests the reject path on out-of-scope text of a kind the
    /// head never saw (the estimate for a task without such examples).
    #[arg(long, requires_all = ["reject_label", "cv"])]
    unseen_oos: bool,
    /// With --cv: skip the realistic estimate (a second cross-validation
    /// that holds out whole paraphrase clusters and trains no out-of-scope
    /// row), which doubles the run time.
    #[arg(long, requires = "cv")]
    no_realistic: bool,
    /// Extract: a template stage before the model, from these intents
    /// files (a templates manifest's name, a file or a folder, as the task
    /// option `templates.sources`); the report gives each stage's share.
    #[arg(long, value_delimiter = ',')]
    templates: Vec<String>,
    /// The home the templates name (Home Assistant's fixture form; as
    /// `templates.home`).
    #[arg(long, requires = "templates")]
    home: Option<PathBuf>,
    /// With --templates: what the templates miss is not recognised.
    #[arg(long, requires = "templates")]
    no_model_stage: bool,
    /// With --templates, for rows whose labels are not the templates'
    /// intents: a JSON list of `{"intent", "slots": {..}, "label"}` rules
    /// (as the task option `templates.labels`).
    #[arg(long, requires = "templates")]
    template_labels: Option<PathBuf>,
    /// With --templates: this many sentences written from each template
    /// sentence join every fold's training rows of the intent head (never
    /// one whose text is evaluated).
    #[arg(long, requires = "templates", default_value_t = 0)]
    template_samples: usize,
    /// With --template-samples: the templates only train the model; they
    /// answer nothing (what the samples do for the model alone).
    #[arg(long, requires = "template_samples")]
    no_template_stage: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EvalKind {
    Classify,
    Extract,
    /// Detector settings on anomaly windows (--test, NAB rows) and on a
    /// labelled series (--series, --faults); with --config and --task, the
    /// configured monitor joins the series grid and the model picks every
    /// note's cause.
    Anomaly,
}

/// The model and how the engine runs it, for `eval` and `bench`: the
/// defaults are the daemon's (`[model]`), so both measure what it runs.
#[derive(clap::Args)]
struct EngineArgs {
    /// A manifest name (installed in the state directory) or a GGUF path.
    #[arg(long, default_value = "smollm2-135m-instruct-q4_1")]
    model: String,
    /// Inference threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    #[arg(long, default_value_t = slmd::config::default_context())]
    context_size: u32,
    /// Context of the slot generator (extract only).
    #[arg(long, default_value_t = slmd::config::default_extract_context())]
    extract_context_size: u32,
    /// Share of the model's blocks classifier heads read (1: all; see the
    /// `model.head_depth` setting).
    #[arg(long, default_value_t = slmd_engine::HEAD_DEPTH)]
    head_depth: f32,
    /// Requantise a Q4_1 model's cut for heads to Q4_0 (see the
    /// `model.head_requantize` setting); `--head-requantize false` keeps Q4_1.
    #[arg(long, default_value_t = slmd_engine::HEAD_REQUANTIZE, action = clap::ArgAction::Set)]
    head_requantize: bool,
    /// Requantise a Q4_1 model to Q4_0 for generation and label scoring
    /// (see the `model.generate_requantize` setting).
    #[arg(long, default_value_t = slmd_engine::GENERATE_REQUANTIZE, action = clap::ArgAction::Set)]
    generate_requantize: bool,
    #[command(flatten)]
    dirs: DirArgs,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Labelled rows: the task is trained on them and they are the messages.
    #[arg(long)]
    train: PathBuf,
    /// Concurrent senders, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Messages answered per concurrency level.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// `extract` also generates each message's slots (as `slmd eval`).
    #[arg(long, value_enum, default_value = "classify")]
    kind: BenchKind,
    /// Extract: known slot values (as `slmd eval --slot-values`).
    #[arg(long)]
    slot_values: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchKind {
    Classify,
    Extract,
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    use crate::eval::{self, TaskSettings};
    use slmd_core::examples::read_jsonl;
    if a.kind == EvalKind::Anomaly {
        return eval_anomaly(a);
    }
    let extra = match &a.extra_train {
        None => eval::Extra::default(),
        Some(path) => {
            let mut tested = Vec::new();
            for p in [&a.train, &a.test].into_iter().flatten() {
                tested.extend(read_jsonl(p)?);
            }
            let extra = eval::read_extra(path, &tested)?;
            eprintln!(
                "--extra-train: {} rows from {} ({} dropped: their text is also in the evaluated rows)",
                extra.rows.len(),
                path.display(),
                extra.dropped
            );
            extra
        }
    };
    let templates = template_stage(&a)?;
    let mut extra = extra;
    if let Some(stage) = templates.as_ref().filter(|_| a.template_samples > 0) {
        let mut tested = std::collections::HashSet::new();
        for p in [&a.train, &a.test].into_iter().flatten() {
            tested.extend(
                read_jsonl(p)?
                    .into_iter()
                    .map(|r| r.text.trim().to_lowercase()),
            );
        }
        let samples = stage.samples(a.template_samples, 1);
        let before = extra.rows.len();
        extra.rows.extend(
            samples
                .into_iter()
                .filter(|s| !tested.contains(&s.text.to_lowercase()))
                // Intent only: written sentences made worse slot prompts
                // than the annotated examples (docs/EVAL.md).
                .map(|s| slmd_core::examples::Row::new(s.text, s.intent)),
        );
        eprintln!(
            "--template-samples: {} rows written from the templates",
            extra.rows.len() - before
        );
    }
    let extract = match a.kind {
        EvalKind::Classify | EvalKind::Anomaly => None,
        EvalKind::Extract => Some(eval::ExtractSettings {
            instruction: a.slot_instruction.clone(),
            known: known_values(a.slot_values.as_deref())?,
            intent_slots: extra.intent_slots,
        }),
    };
    let settings = TaskSettings {
        extra: extra.rows,
        extract,
        strategy: a.strategy,
        instruction: a.instruction.clone(),
        cue: a.cue.clone(),
        lexical_weight: a.lexical_weight,
        concept_weight: a.concept_weight,
        abstain_below: a.abstain_below,
        reject_label: a.reject_label.clone(),
        novelty_quantile: a.novelty_quantile,
        unseen_oos: a.unseen_oos,
        templates: templates.filter(|_| !a.no_template_stage),
    };
    if a.seed.len() > 1 && (a.cv.is_none() || a.task.is_some()) {
        anyhow::bail!("several --seed values need --cv K (and --train, not --task)");
    }
    let (engine, trials, reject, grouped) = if let Some(task) = &a.task {
        let config_path = a
            .engine
            .dirs
            .config
            .as_ref()
            .context("--task needs --config")?;
        let config = load(config_path)?;
        let test = read_jsonl(a.test.as_ref().context("--task needs --test")?)?;
        let reject = config
            .task(task)
            .context("no such task")?
            .reject_label
            .clone();
        let engine = slmd::start_engine(&config)?;
        (engine, vec![(task.clone(), test)], reject, (Vec::new(), 0))
    } else {
        let train = read_jsonl(a.train.as_ref().context("--train is required")?)?;
        let mut realistic = Vec::new();
        let mut clusters = 0;
        let trials = match (a.cv, &a.test) {
            (Some(k), None) if k >= 2 && k <= train.len() => {
                if !a.no_realistic {
                    let unseen = TaskSettings {
                        unseen_oos: settings.reject_label.is_some(),
                        ..settings.clone()
                    };
                    let groups = eval::paraphrase_groups(&train);
                    clusters = groups
                        .iter()
                        .collect::<std::collections::HashSet<_>>()
                        .len();
                    let split = eval::Split::Groups(&groups);
                    realistic = eval::cross_validation(&train, k, &a.seed, &unseen, split);
                }
                eval::cross_validation(&train, k, &a.seed, &settings, eval::Split::Rows)
            }
            (Some(k), None) => anyhow::bail!("--cv {k}: needs 2 <= K <= the number of rows"),
            (None, Some(test)) => eval::holdout(&train, read_jsonl(test)?, &settings),
            _ => anyhow::bail!("give either --cv K or --test FILE"),
        };
        let opts = engine_options(&a.engine)?;
        let names = |ts: &[eval::Trial]| -> Vec<(String, Vec<slmd_core::examples::Row>)> {
            ts.iter()
                .map(|t| (t.spec.name.clone(), t.test.clone()))
                .collect()
        };
        let (main, grouped) = (names(&trials), names(&realistic));
        let specs = trials
            .into_iter()
            .chain(realistic)
            .map(|t| t.spec)
            .collect();
        let engine = slmd_engine::Engine::start(opts, specs)?;
        (engine, main, a.reject_label.clone(), (grouped, clusters))
    };
    let (mut report, outcomes) = eval::run(&engine, &trials, reject.as_deref())?;
    if !grouped.0.is_empty() {
        eprintln!(
            "realistic estimate: {} paraphrase clusters held out whole",
            grouped.1
        );
        let (r, _) = eval::run(&engine, &grouped.0, reject.as_deref())?;
        report.realistic = Some(eval::metrics::Realistic {
            clusters: grouped.1,
            accuracy: r.accuracy,
            in_scope_accuracy: r.in_scope_accuracy,
            oos_rejection: r.oos_rejection,
        });
    }
    if a.seed.len() > 1 {
        report.per_seed = eval::metrics::per_seed(&outcomes, &a.seed, reject.as_deref());
    }
    report.per_stage = eval::metrics::per_stage(&outcomes, reject.as_deref());
    if let Some(path) = &a.predictions {
        let mut lines = String::new();
        for o in &outcomes {
            lines.push_str(&serde_json::to_string(o)?);
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `slmd eval --kind anomaly`.
fn eval_anomaly(a: EvalArgs) -> anyhow::Result<ExitCode> {
    use crate::eval::anomaly;
    let test = a
        .test
        .as_ref()
        .context("--kind anomaly needs --test (NAB rows)")?;
    let nab = slmd_core::examples::read_jsonl(test)?
        .iter()
        .enumerate()
        .map(|(i, r)| anomaly::parse_nab(i, r))
        .collect::<Result<Vec<_>, _>>()?;
    let config = match (&a.engine.dirs.config, &a.task) {
        (Some(path), Some(task)) => {
            let config = load(path)?;
            let t = config.task(task).context("no such task")?.clone();
            if t.monitor().is_none() {
                anyhow::bail!("task {task:?} is not a monitor task");
            }
            Some((config, t))
        }
        (None, None) => None,
        _ => anyhow::bail!("--config and --task go together"),
    };
    let engine = match &config {
        Some((c, t)) => Some(slmd_engine::Engine::start(
            engine_options(&a.engine)?,
            vec![slmd::task_spec(c, t)?],
        )?),
        None => None,
    };
    let series = match (&a.series, &a.faults) {
        (Some(file), Some(faults)) => Some(anomaly::Series {
            file,
            faults,
            configured: config.as_ref().and_then(|(_, t)| t.monitor()),
        }),
        (None, None) => None,
        _ => anyhow::bail!("--series and --faults go together"),
    };
    let causes = match (&engine, &config) {
        (Some(engine), Some((_, t))) => Some(anomaly::Causes {
            engine,
            task: &t.name,
        }),
        _ => None,
    };
    let report = anomaly::run(&nab, series, causes)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--templates`: the stage, with the home and the known slot values
/// (`--slot-values`) as the daemon compiles it; none when not asked for.
fn template_stage(a: &EvalArgs) -> anyhow::Result<Option<slmd_engine::TemplateStage>> {
    if a.templates.is_empty() {
        return Ok(None);
    }
    anyhow::ensure!(
        a.kind == EvalKind::Extract || a.no_template_stage,
        "--templates is for --kind extract (or for training alone: --no-template-stage)"
    );
    let (state, manifests) = dirs(DirArgs {
        config: None,
        state_dir: a.engine.dirs.state_dir.clone(),
        manifests: a.engine.dirs.manifests.clone(),
    })?;
    let config = slmd::config::TemplatesConfig {
        sources: a.templates.clone(),
        home: a.home.clone(),
        model_stage: !a.no_model_stage,
        labels: match &a.template_labels {
            Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
                .with_context(|| format!("--template-labels {}", p.display()))?,
            None => Vec::new(),
        },
        train_samples: a.template_samples,
    };
    let stage = slmd::serving::template_stage_in(&state, &manifests, &config, &[])?;
    eprintln!("--templates: {} sentences", stage.templates.len());
    Ok(Some(stage))
}

/// `--slot-values`: the known values of slots, none when not given.
fn known_values(path: Option<&Path>) -> anyhow::Result<crate::eval::slots::Known> {
    Ok(match path {
        Some(path) => crate::eval::slots::read_known(path)?,
        None => Default::default(),
    })
}

/// Engine options for `eval` and `bench`: the model by name or path; no
/// head cache, so what is measured includes training.
fn engine_options(a: &EngineArgs) -> anyhow::Result<slmd_engine::EngineOptions> {
    anyhow::ensure!(
        a.head_depth > 0.0 && a.head_depth <= 1.0,
        "--head-depth {}: must be above 0 and at most 1",
        a.head_depth
    );
    let (state, manifests) = dirs(DirArgs {
        config: None,
        state_dir: a.dirs.state_dir.clone(),
        manifests: a.dirs.manifests.clone(),
    })?;
    let model = if std::path::Path::new(&a.model).is_file() {
        slmd::ModelRef::Path(PathBuf::from(&a.model))
    } else {
        slmd::ModelRef::Name {
            name: &a.model,
            state_dir: state,
            manifests,
        }
    };
    let (model_path, model, format) = slmd::locate_model(model)?;
    Ok(slmd_engine::EngineOptions {
        model_path,
        model,
        format,
        context_size: a.context_size,
        threads: a.threads,
        queue: 64,
        head_cache: None,
        decode: Default::default(),
        extract_context: a.extract_context_size,
        head_depth: a.head_depth,
        head_requantize: a.head_requantize,
        generate_requantize: a.generate_requantize,
        tuning: Default::default(),
        progress: Default::default(),
    })
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let rows = slmd_core::examples::read_jsonl(&a.train)?;
    let settings = crate::eval::TaskSettings {
        strategy: Default::default(),
        instruction: slmd::config::default_instruction(),
        cue: slmd::config::default_cue(),
        lexical_weight: slmd::config::default_lexical_weight(),
        concept_weight: slmd::config::default_concept_weight(),
        abstain_below: 0.0,
        reject_label: None,
        novelty_quantile: slmd_engine::NOVELTY_QUANTILE,
        unseen_oos: false,
        extract: match a.kind {
            BenchKind::Classify => None,
            BenchKind::Extract => Some(crate::eval::ExtractSettings {
                instruction: slmd_engine::extract::DEFAULT_INSTRUCTION.into(),
                known: known_values(a.slot_values.as_deref())?,
                intent_slots: Default::default(),
            }),
        },
        extra: Vec::new(),
        templates: None,
    };
    let trial = crate::eval::holdout(&rows, Vec::new(), &settings).remove(0);
    let mut opts = engine_options(&a.engine)?;
    // Train once; the other configurations load the same head.
    let cache = tempfile_dir()?;
    opts.head_cache = Some(cache.clone());
    let results = crate::eval::bench::run(&opts, &trial.spec, &rows, &a.concurrency, a.messages);
    let _ = std::fs::remove_dir_all(&cache);
    let results = results?;
    if a.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        print!("{}", crate::eval::bench::to_markdown(&results));
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("slmd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
