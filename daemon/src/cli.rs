//! What the `slmd` command's subcommands share: loading a config (which
//! sets the log level) and finding the state and manifest directories.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// Where models are stored and manifests are read.
#[derive(clap::Args)]
pub struct DirArgs {
    /// Take the state directory and manifest directory from this config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long)]
    pub manifests: Option<PathBuf>,
}

/// [`Config::load`], then the config's `[log] level` from now on.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    let level = config.log.level.parse().unwrap_or(log::LevelFilter::Info);
    crate::logging::set_level(level);
    Ok(config)
}

/// State and manifest directories from flags, else the config, else defaults.
pub fn dirs(
    DirArgs {
        config,
        state_dir,
        manifests,
    }: DirArgs,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let config = config.map(|c| load(&c)).transpose()?;
    let state = state_dir
        .or_else(|| config.as_ref().map(Config::state_dir))
        .unwrap_or_else(|| PathBuf::from("/var/lib/slmd"));
    let manifests = manifests
        .or_else(|| config.as_ref().map(|c| c.resolve(&c.model.manifests)))
        .unwrap_or_else(|| PathBuf::from("/usr/share/slmd/models"));
    Ok((state, manifests))
}
