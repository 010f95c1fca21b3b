//! The `slmd` command: parse arguments, load and check config, dispatch, and
//! map every error to an exit code (78 for bad configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
mod bundle_cmd;

use clap::{Parser, Subcommand};
use slmd::cli::{dirs, load, DirArgs};
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
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCommand),
    #[cfg(feature = "tools")]
    #[command(flatten)]
    Tools(slmd_tools::ToolCommand),
    /// Inbox depth, outbox depth, dead letters and the oldest pending ages,
    /// as JSON; works while the daemon runs.
    Status {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
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

impl Command {
    /// The level logged until a config says otherwise.
    fn log_level(&self) -> log::LevelFilter {
        match self {
            #[cfg(feature = "tools")]
            Command::Tools(t) => t.log_level(),
            _ => log::LevelFilter::Info,
        }
    }
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
    slmd::logging::init(cli.command.log_level());
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
        #[cfg(feature = "tools")]
        Command::Tools(t) => slmd_tools::run(t),
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
        Command::Model(ModelCommand::Bundle(cmd)) => bundle_cmd::run(cmd),
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
