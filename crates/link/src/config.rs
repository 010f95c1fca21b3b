//! The `[broker]` section of the configuration: where and how to connect.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A password: read from the file like any string, never printed (its
/// `Debug` says only that it is set).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Stable across restarts: the broker keeps our session (and the QoS 1
    /// messages queued for us while we were away) under this id.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Or the password is the first line of this file (relative to the
    /// config), kept out of the config and readable by slmd alone.
    pub password_file: Option<PathBuf>,
    /// Or a systemd credential (`LoadCredential=NAME:...` in the unit):
    /// the password is read from `$CREDENTIALS_DIRECTORY/NAME`.
    pub password_credential: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Upper bound on the reconnect backoff.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
    /// Results published but not yet acknowledged by the broker, and
    /// messages the broker may send before we acknowledge (MQTT 5 receive
    /// maximum).
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// How long the broker keeps our session (subscriptions and the QoS 1
    /// messages queued for us) while we are disconnected.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// Connect over TLS (the broker's port is then usually 8883).
    pub tls: Option<TlsConfig>,
    /// Retained `{"state": "online"}` while connected, and the Last Will
    /// `{"state": "offline"}` the broker publishes when slmd vanishes.
    /// Default `slmd/<client_id>/status`.
    pub status_topic: Option<String>,
}

impl BrokerConfig {
    /// The password from wherever the config says it is; a file is
    /// relative to `base_dir` (the config file's directory).
    pub fn password(&self, base_dir: &Path) -> Result<Option<String>, (PathBuf, std::io::Error)> {
        let b = self;
        let path = if let Some(f) = &b.password_file {
            base_dir.join(f)
        } else if let Some(name) = &b.password_credential {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                (
                    PathBuf::from(format!("$CREDENTIALS_DIRECTORY/{name}")),
                    std::io::Error::other("CREDENTIALS_DIRECTORY is not set (LoadCredential=)"),
                )
            })?;
            PathBuf::from(dir).join(name)
        } else {
            return Ok(b.password.as_ref().map(|p| p.0.clone()));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| (path, e))?;
        Ok(Some(text.lines().next().unwrap_or("").to_owned()))
    }

    pub fn status_topic(&self) -> String {
        self.status_topic
            .clone()
            .unwrap_or_else(|| format!("slmd/{}/status", self.client_id))
    }
}

/// TLS to the broker; paths are relative to the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that require one.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_backoff() -> u64 {
    30
}
fn default_inflight() -> u16 {
    32
}
fn default_session_expiry() -> u32 {
    // A week: a device can be offline that long without losing queued input.
    7 * 24 * 3600
}
