//! Why the daemon cannot start or stopped, and whether starting again can
//! help (the exit code).

use std::path::PathBuf;

use crate::{bundle, injection};
use slmd_engine::models::ModelError;
use slmd_engine::EngineError;

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
    #[error(transparent)]
    Templates(#[from] slmd_templates::TemplateError),
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
            | RunError::Templates(_)
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
