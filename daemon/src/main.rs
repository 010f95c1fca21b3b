//! The `slmd` command: parse arguments, load and check config, dispatch, and
//! map every error to an exit code (78 for bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
mod bundle_cmd;

use clap::{Parser, Subcommand};
use slmd::config::{Config, ConfigError, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    name = "slmd",
    version,
    about = "Offline small-language-model daemon: MQTT in, llama.cpp inference, MQTT out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
        /// Override the broker address: mqtt://HOST:PORT.
        #[arg(long)]
        broker: Option<slmd_link::BrokerAddr>,
        /// Measure the message path alone: answer every message with its
        /// task's first label, without loading the model.
        #[arg(long, hide = true)]
        no_inference: bool,
    },
    /// Classify one text with a configured task and print the result JSON.
    Classify {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
        #[arg(long)]
        task: String,
        text: String,
    },
    /// Validate a configuration file and print every problem.
    CheckConfig {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// Evaluate classification on labelled JSONL rows and print the report.
    ///
    /// `--train A --test B`: train on A, test on B. `--train A --cv K`:
    /// K-fold cross-validation on A. `--config FILE --task NAME --test B`:
    /// test a configured task on B.
    Eval(Box<EvalArgs>),
    /// Latency and throughput through the engine at several concurrencies,
    /// with and without prefix caching and batching.
    Bench(BenchArgs),
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCommand),
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
    /// Inbox depth, outbox depth, dead letters and the oldest pending ages,
    /// as JSON; works while the daemon runs.
    Status {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
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
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    head_requantize: bool,
    #[command(flatten)]
    dirs: DirArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
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

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a model by manifest name, verify size and sha256, install it.
    Fetch {
        name: String,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// List the manifests and whether each model is installed, then the
    /// installed bundles.
    List {
        #[command(flatten)]
        dirs: DirArgs,
    },
    #[command(flatten)]
    Bundle(bundle_cmd::BundleCommand),
}

/// Where models are stored and manifests are read.
#[derive(clap::Args)]
struct DirArgs {
    /// Take the state directory and manifest directory from this config.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    manifests: Option<PathBuf>,
}

/// glibc gives threads that allocate at the same moment arenas of their
/// own (up to 8 per core) and keeps what each has touched: the daemon's
/// memory then follows how many threads once raced, not what it holds.
/// Two arenas: under steady traffic RSS grew 24.5 -> 30.2 MB between the
/// halves of the growth test with glibc's default, 21.0 -> 21.5 MB with
/// two. `MALLOC_ARENA_MAX` in the environment still decides when set.
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    bound_malloc_arenas();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<ConfigError>().is_some() {
                eprintln!("slmd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            // A model, examples or TLS file the configuration names that
            // is not there: restarting cannot help either.
            if e.downcast_ref::<slmd::RunError>()
                .is_some_and(slmd::RunError::is_config)
            {
                eprintln!("slmd: configuration: {}", describe(&e));
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("slmd: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: most of our errors already
/// end with their cause's text, which anyhow's `{:#}` would repeat.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !out.ends_with(&cause) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&cause);
        }
    }
    out
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    let level = config.log.level.parse().unwrap_or(log::LevelFilter::Info);
    slmd::logging::init(level);
    Ok(config)
}

/// State and manifest directories from flags, else the config, else defaults.
fn dirs(
    DirArgs {
        config,
        state_dir,
        manifests,
    }: DirArgs,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let config = config.map(|c| load(&c)).transpose()?;
    if config.is_none() {
        slmd::logging::init(log::LevelFilter::Info);
    }
    let state = state_dir
        .or_else(|| config.as_ref().map(Config::state_dir))
        .unwrap_or_else(|| PathBuf::from("/var/lib/slmd"));
    let manifests = manifests
        .or_else(|| config.as_ref().map(|c| c.resolve(&c.model.manifests)))
        .unwrap_or_else(|| PathBuf::from("/usr/share/slmd/models"));
    Ok((state, manifests))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let found = slmd::check_files(&c, &config);
            for note in &found.notes {
                eprintln!("slmd: note: {note}");
            }
            if !found.problems.is_empty() {
                return Err(ConfigError::Invalid {
                    path: config,
                    problems: found.problems,
                }
                .into());
            }
            println!("{}: valid ({} task(s))", config.display(), c.tasks.len());
            for w in c.warnings() {
                println!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            broker,
            no_inference,
        } => {
            let inference = if no_inference {
                slmd::Inference::Skipped
            } else {
                slmd::Inference::Model
            };
            let path = config;
            let config = load(&path)?;
            // The blocking pool runs store flushes and recovery, the engine's
            // start and config reloads. Bounded: under a slow disk the
            // default (512) grew it by a thread per waiting flush, each with
            // its own malloc arena (RSS +36% in the steady-traffic test).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(8)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    log::info!("shutting down");
                    let _ = tx.send(true);
                });
                let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
                tokio::spawn(reload_on_sighup(path, reload_tx));
                slmd::run(config, broker, inference, reloads, rx).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Classify { config, task, text } => {
            let config = load(&config)?;
            if config.task(&task).is_none() {
                anyhow::bail!("no task named {task:?} in the configuration");
            }
            let engine = slmd::start_engine(&config)?;
            let scores = engine.infer_blocking(&task, text.clone())?;
            let id = slmd::payload::derived_id("cli", text.as_bytes());
            let result = slmd::payload::TaskResult::new(
                id,
                &task,
                &scores,
                &engine.model,
                scores.inference_ms,
            );
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => eval(*args),
        Command::Replay {
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
            let rows = slmd::monitor::replay::read(&file, sensor.as_deref())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let opts = slmd::monitor::replay::Options {
                host: &broker.host,
                port: broker.port,
                topic: &topic,
                rate,
                unit: unit.as_deref(),
                ack_timeout: std::time::Duration::from_secs(30),
            };
            let sent = runtime.block_on(slmd::monitor::replay::publish(&rows, &opts))?;
            println!(
                "{}: {sent} readings published to {topic} and acknowledged",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench(args),
        Command::Model(ModelCommand::Fetch { name, dirs: d }) => {
            let (state, manifests) = dirs(d)?;
            let manifest = slmd_engine::models::find_manifest(&manifests, &name)?;
            let store = slmd_engine::models::ModelStore::open(&state)?;
            let started = std::time::Instant::now();
            let path = store
                .fetch(&manifest)
                .with_context(|| format!("fetching model {name}"))?;
            println!(
                "{name}: installed and verified at {} ({:.1} s)",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config } => {
            let config = Config::load(&config)?;
            let status = slmd::status::read(&config.state_dir())?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Bundle(cmd)) => bundle_cmd::run(cmd, load),
        Command::Model(ModelCommand::List { dirs: d }) => {
            let (state, manifests) = dirs(d)?;
            let store = slmd_engine::models::ModelStore::open(&state)?;
            for m in slmd_engine::models::list_manifests(&manifests)? {
                let status = match store.installed(&m) {
                    Some(p) => format!("installed at {}", p.display()),
                    None => "not installed".into(),
                };
                println!("{}\t{} bytes\t{}\t{status}", m.name, m.size, m.licence);
            }
            // Bundles, when any were ever installed here.
            if state.join("bundles").is_dir() {
                println!("bundles (slmd model bundles):");
                bundle_cmd::print_bundles(&slmd::bundle::store::BundleStore::open(&state)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    use slmd::eval::{self, TaskSettings};
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
    };
    if a.seed.len() > 1 && (a.cv.is_none() || a.task.is_some()) {
        anyhow::bail!("several --seed values need --cv K (and --train, not --task)");
    }
    let (engine, trials, reject) = if let Some(task) = &a.task {
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
        (engine, vec![(task.clone(), test)], reject)
    } else {
        let train = read_jsonl(a.train.as_ref().context("--train is required")?)?;
        let trials = match (a.cv, &a.test) {
            (Some(k), None) if k >= 2 && k <= train.len() => {
                eval::cross_validation(&train, k, &a.seed, &settings)
            }
            (Some(k), None) => anyhow::bail!("--cv {k}: needs 2 <= K <= the number of rows"),
            (None, Some(test)) => eval::holdout(&train, read_jsonl(test)?, &settings),
            _ => anyhow::bail!("give either --cv K or --test FILE"),
        };
        let level = if a.json {
            log::LevelFilter::Warn
        } else {
            log::LevelFilter::Info
        };
        slmd::logging::init(level);
        let opts = engine_options(&a.engine)?;
        let names = trials
            .iter()
            .map(|t| (t.spec.name.clone(), t.test.clone()))
            .collect();
        let engine =
            slmd_engine::Engine::start(opts, trials.into_iter().map(|t| t.spec).collect())?;
        (engine, names, a.reject_label.clone())
    };
    let (mut report, outcomes) = eval::run(&engine, &trials, reject.as_deref())?;
    if a.seed.len() > 1 {
        report.per_seed = eval::metrics::per_seed(&outcomes, &a.seed, reject.as_deref());
    }
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
    use slmd::eval::anomaly;
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
            if t.monitor.is_none() {
                anyhow::bail!("task {task:?} is not a monitor task");
            }
            Some((config, t))
        }
        (None, None) => {
            slmd::logging::init(log::LevelFilter::Warn);
            None
        }
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
            configured: config.as_ref().and_then(|(_, t)| t.monitor.as_ref()),
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

/// `--slot-values`: the known values of slots, none when not given.
fn known_values(path: Option<&Path>) -> anyhow::Result<slmd::eval::slots::Known> {
    Ok(match path {
        Some(path) => slmd::eval::slots::read_known(path)?,
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
        tuning: Default::default(),
    })
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    slmd::logging::init(log::LevelFilter::Warn);
    let rows = slmd_core::examples::read_jsonl(&a.train)?;
    let settings = slmd::eval::TaskSettings {
        strategy: Default::default(),
        instruction: slmd::config::default_instruction(),
        cue: slmd::config::default_cue(),
        lexical_weight: slmd::config::default_lexical_weight(),
        concept_weight: slmd::config::default_concept_weight(),
        abstain_below: 0.0,
        reject_label: None,
        extract: match a.kind {
            BenchKind::Classify => None,
            BenchKind::Extract => Some(slmd::eval::ExtractSettings {
                instruction: slmd_engine::extract::DEFAULT_INSTRUCTION.into(),
                known: known_values(a.slot_values.as_deref())?,
                intent_slots: Default::default(),
            }),
        },
        extra: Vec::new(),
    };
    let trial = slmd::eval::holdout(&rows, Vec::new(), &settings).remove(0);
    let mut opts = engine_options(&a.engine)?;
    // Train once; the other configurations load the same head.
    let cache = tempfile_dir()?;
    opts.head_cache = Some(cache.clone());
    let results = slmd::eval::bench::run(&opts, &trial.spec, &rows, &a.concurrency, a.messages);
    let _ = std::fs::remove_dir_all(&cache);
    let results = results?;
    if a.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        print!("{}", slmd::eval::bench::to_markdown(&results));
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("slmd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// SIGHUP: reads the configuration file again; a valid one goes to the
/// daemon, an invalid one is reported and the running one stays.
async fn reload_on_sighup(path: PathBuf, reloads: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        log::info!("SIGHUP: reloading {}", path.display());
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        match loaded {
            Ok(Ok(config)) => {
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => log::error!("reload refused: {e}; keeping the running configuration"),
            Err(e) => log::error!("reload failed: {e}"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::describe;
    use anyhow::Context;

    #[test]
    fn an_error_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read x.jsonl: {source}")]
        struct Read {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(Read { source: io });
        assert_eq!(describe(&e), "cannot read x.jsonl: gone");
        let e = Err::<(), _>(e).context("eval").unwrap_err();
        assert_eq!(describe(&e), "eval: cannot read x.jsonl: gone");
    }
}
