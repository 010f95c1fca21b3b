//! `slmd model install | activate | rollback | verify | bundles | sign |
//! keygen`: the model update commands. They change the bundle store under
//! the configured state directory and then ask a running daemon (the pid in
//! `<state>/slmd.lock`) to pick the change up with SIGHUP.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use slmd::bundle::store::BundleStore;
use slmd::bundle::{self, BundleManifest};
use slmd::cli::load;
use slmd::config::Config;
use slmd::update;

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Install a bundle from a file or http(s) URL: verify it and keep it in
    /// the store; with --activate also run the canary and make it active.
    Install {
        source: String,
        #[arg(long)]
        activate: bool,
        /// Accept a version older than the active one.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// Run the canary on an installed bundle (by version or id) and make it
    /// active.
    Activate {
        version: String,
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// Make the previously active bundle (or the `[model]` model) active.
    Rollback {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// The installed bundles and the pointer.
    Bundles {
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// Check a bundle file as `install` would, without installing it.
    Verify {
        file: PathBuf,
        #[arg(long, default_value = "/etc/slmd/slmd.toml")]
        config: PathBuf,
    },
    /// Make a bundle file: write its manifest for a GGUF model, sign the
    /// manifest with a minisign secret key (password from
    /// SLMD_KEY_PASSWORD when the key is encrypted) and pack all three.
    Sign {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "unknown")]
        licence: String,
        #[arg(long, default_value = "chatml")]
        prompt_format: String,
        #[arg(long, default_value = "0.1.0")]
        min_slmd: String,
        /// minisign secret key; without it the bundle is unsigned.
        #[arg(long)]
        secret_key: Option<PathBuf>,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Make a minisign key pair (KEY.pub, KEY.key; the secret key is
    /// encrypted with SLMD_KEY_PASSWORD when set).
    Keygen { key: PathBuf },
}

fn store(config: &Config) -> anyhow::Result<BundleStore> {
    Ok(BundleStore::open(&config.state_dir())?)
}

/// Asks a running daemon to reload (and so to pick up the pointer).
fn tell_daemon(config: &Config) {
    match slmd_store::lock::holder(&config.state_dir()) {
        Some(pid) => match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP) {
            Ok(()) => println!("told slmd (pid {pid}) to switch models (SIGHUP)"),
            Err(e) => eprintln!("cannot signal slmd (pid {pid}): {e}; reload it to switch"),
        },
        None => println!("slmd is not running; it starts with this model"),
    }
}

pub fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCommand::Install {
            source,
            activate,
            force,
            config,
        } => {
            let config = load(&config)?;
            let store = store(&config)?;
            // The operator at the command line may name any source.
            let req = update::Request {
                source,
                activate,
                force,
                network: None,
            };
            let (outcome, _engine) = update::run(&config, &store, &req)?;
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            if outcome.activated {
                tell_daemon(&config);
            }
        }
        BundleCommand::Activate { version, config } => {
            let config = load(&config)?;
            let store = store(&config)?;
            let b = store.find(&version)?;
            let (report, _engine) = update::activate(&config, &store, &b)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            tell_daemon(&config);
        }
        BundleCommand::Rollback { config } => {
            let config = load(&config)?;
            let store = store(&config)?;
            let _lock = store.lock()?;
            let now = store.rollback("manual rollback")?;
            println!("active: {}", now.as_deref().unwrap_or("the [model] model"));
            tell_daemon(&config);
        }
        BundleCommand::Bundles { config } => {
            let config = load(&config)?;
            let p = print_bundles(&store(&config)?)?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        BundleCommand::Verify { file, config } => {
            let config = load(&config)?;
            let dir = tempfile_dir(&config)?;
            let result = bundle::unpack(&file, &dir)
                .and_then(|()| bundle::verify_staged(&dir, &config.updates.trust()));
            let _ = std::fs::remove_dir_all(&dir);
            let v = result?;
            println!(
                "{}: {} {} verified ({}, id {})",
                file.display(),
                v.manifest.name,
                v.manifest.version,
                if v.signed { "signed" } else { "unsigned" },
                v.id
            );
        }
        BundleCommand::Sign {
            model,
            name,
            version,
            licence,
            prompt_format,
            min_slmd,
            secret_key,
            out,
        } => {
            let sha = slmd_engine::models::sha256_file(&model)
                .with_context(|| format!("hashing {}", model.display()))?;
            let size = std::fs::metadata(&model)?.len();
            let manifest = BundleManifest {
                name,
                version,
                model_sha256: sha,
                model_size: size,
                licence,
                prompt_format: toml::Value::String(prompt_format).try_into()?,
                min_slmd,
            };
            let text = toml::to_string(&manifest)?;
            BundleManifest::parse(&text)?;
            let password = std::env::var("SLMD_KEY_PASSWORD").ok();
            let sig = secret_key
                .map(|k| bundle::sign::sign(text.as_bytes(), &k, password))
                .transpose()?;
            bundle::pack(&out, &text, sig.as_deref(), &model)?;
            println!(
                "{}: {} {} ({})",
                out.display(),
                manifest.name,
                manifest.version,
                if sig.is_some() { "signed" } else { "unsigned" }
            );
        }
        BundleCommand::Keygen { key } => {
            let password = std::env::var("SLMD_KEY_PASSWORD").ok();
            let encrypted = password.is_some();
            let (b64, pk, sk) = bundle::sign::keygen(password)?;
            let pub_path = key.with_extension("pub");
            let key_path = key.with_extension("key");
            std::fs::write(&pub_path, pk)?;
            write_private(&key_path, &sk)?;
            println!(
                "public key {} (for [updates] trusted_keys), secret key {}{}\n\
                 trusted_keys = [\"{b64}\"]",
                pub_path.display(),
                key_path.display(),
                if encrypted {
                    ""
                } else {
                    " (not encrypted: set SLMD_KEY_PASSWORD to encrypt)"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per installed bundle: version, name, id prefix, licence and
/// whether it is active, kept for rollback or only installed.
pub fn print_bundles(store: &BundleStore) -> anyhow::Result<slmd::bundle::store::Pointer> {
    let p = store.pointer()?;
    for b in store.list()? {
        let mark = if p.active.as_ref() == Some(&b.id) {
            "active"
        } else if p.history.iter().flatten().any(|h| *h == b.id) {
            "kept"
        } else {
            "installed"
        };
        let m = &b.manifest;
        println!(
            "{}\t{}\t{}\t{}\t{mark}",
            m.version,
            m.name,
            &b.id[..16],
            m.licence
        );
    }
    Ok(p)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A scratch directory in the store's staging area (same file system).
fn tempfile_dir(config: &Config) -> anyhow::Result<PathBuf> {
    let store = store(config)?;
    let dir = store
        .staging()
        .join(format!("verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
