//! The `slmd` command: parse arguments, load and check config, dispatch, and
//! map every error to an exit code (78 for bad configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
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
        broker: Option<slmd::mqtt::BrokerAddr>,
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
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a model by manifest name, verify size and sha256, install it.
    Fetch {
        name: String,
        #[command(flatten)]
        dirs: DirArgs,
    },
    /// List the manifests and whether each model is installed.
    List {
        #[command(flatten)]
        dirs: DirArgs,
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<ConfigError>().is_some() {
                eprintln!("slmd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("slmd: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: valid ({} task(s))", config.display(), c.tasks.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(e.into()),
        },
        Command::Run { config, broker } => {
            let config = load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    log::info!("shutting down");
                    let _ = tx.send(true);
                });
                slmd::run(config, broker, rx).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Classify { config, task, text } => {
            let config = load(&config)?;
            if config.task(&task).is_none() {
                anyhow::bail!("no task named {task:?} in the configuration");
            }
            let engine = slmd::start_engine(&config)?;
            let scores = engine.classify_blocking(&task, text.clone())?;
            let id = slmd::payload::derived_id("cli", text.as_bytes());
            let result = slmd::payload::ClassifyResult::new(
                id,
                &task,
                &scores.ranked,
                &engine.model,
                scores.inference_ms,
                scores.inference_ms,
            );
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Fetch { name, dirs: d }) => {
            let (state, manifests) = dirs(d)?;
            let manifest = slmd::models::find_manifest(&manifests, &name)?;
            let store = slmd::models::ModelStore::open(&state)?;
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
        Command::Model(ModelCommand::List { dirs: d }) => {
            let (state, manifests) = dirs(d)?;
            let store = slmd::models::ModelStore::open(&state)?;
            for m in slmd::models::list_manifests(&manifests)? {
                let status = match store.installed(&m) {
                    Some(p) => format!("installed at {}", p.display()),
                    None => "not installed".into(),
                };
                println!("{}\t{} bytes\t{}\t{status}", m.name, m.size, m.licence);
            }
            Ok(ExitCode::SUCCESS)
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
