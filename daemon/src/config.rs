//! Configuration: TOML on disk, validated as a whole before anything starts.
//!
//! Parsing rejects unknown keys (a typo must not silently fall back to a
//! default). [`Config::load`] then runs [`Config::validate`], which collects
//! *every* problem with its key path (`tasks[1].labels[3].name: duplicate
//! label "off"`) so a user fixes a file in one pass. The binary maps
//! [`ConfigError`] to exit code 78 (EX_CONFIG); the systemd unit does not
//! restart on it.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use slmd_core::examples::{read_jsonl, Example, ExamplesError};
pub use slmd_link::config::{BrokerConfig, Secret, TlsConfig};

/// Exit code for an invalid configuration (sysexits.h EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n{}", .problems.len(), list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One validation problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path in the file, such as `tasks[0].output_topic`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    pub state: StateConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub updates: UpdatesConfig,
    #[serde(default, deserialize_with = "tasks")]
    pub tasks: Vec<TaskConfig>,
    /// Directory the file was loaded from; relative paths in it resolve here.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Holds the durable store and the model store.
    pub dir: PathBuf,
    /// Memory the store's page cache may hold (sled's cache capacity).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A manifest name from `manifests` (fetched with `slmd model fetch`).
    pub name: Option<String>,
    /// Or a GGUF file used as is.
    pub path: Option<PathBuf>,
    /// Where manifests live.
    #[serde(default = "default_manifests")]
    pub manifests: PathBuf,
    /// Inference threads; 0 means one per CPU.
    #[serde(default)]
    pub threads: u32,
    /// Context cells for inputs decoded together (one batch); the tasks'
    /// fixed prompts are held beside them.
    #[serde(default = "default_context")]
    pub context_size: u32,
    /// Context of the slot generator of extract tasks: its intents' prompts
    /// stay decoded in it (about 150 cells each) beside 2048 working cells.
    #[serde(default = "default_extract_context")]
    pub extract_context_size: u32,
    /// Share of the model's blocks classifier heads read (0 < d <= 1). At
    /// the default 0.8 heads read the model cut to its first four fifths, a
    /// second, smaller file derived once into the state directory; 1.0
    /// reads the whole model and loads it only once.
    #[serde(default = "default_head_depth")]
    pub head_depth: f32,
    /// When the model's block weights are Q4_1, the heads' cut model is
    /// requantised to Q4_0, which llama.cpp's CPU kernels multiply faster
    /// (about a quarter less time per message); false keeps Q4_1.
    #[serde(default = "default_head_requantize")]
    pub head_requantize: bool,
    /// Likewise for the whole model that slot generation and label scoring
    /// read: a Q4_0 copy is derived once into the state directory (about
    /// half the time per generated token; docs/EVAL.md "Q4_0 heads"). Off
    /// unless set: slot F1 moves by dataset, up or down.
    #[serde(default = "default_generate_requantize")]
    pub generate_requantize: bool,
    /// Lock the model in RAM (needs RLIMIT_MEMLOCK >= the model's size).
    #[serde(default)]
    pub mlock: bool,
    /// Nice value (-20..19) of the inference thread only.
    pub nice: Option<i32>,
    /// CPUs the inference thread may run on (e.g. [2, 3]); default any.
    #[serde(default)]
    pub cpus: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Payloads larger than this get an error result, not inference.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Text longer than this many characters is refused (the model's context
    /// is small; long text also means slow inference for everyone behind it).
    #[serde(default = "default_max_text_chars")]
    pub max_text_chars: usize,
    /// Messages being inferred at once (bounded work in flight).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long a processed message id is remembered, so that a redelivery
    /// of it is not processed twice.
    #[serde(default = "default_dedup_window")]
    pub dedup_window_secs: u64,
    /// For messages without an id (identified by topic and payload hash):
    /// how long a fresh copy counts as a duplicate. A copy the broker marks
    /// as a redelivery (DUP) counts for the whole `dedup_window_secs`; a
    /// user repeating a command after this window gets a new answer.
    #[serde(default = "default_content_dedup_window")]
    pub content_dedup_window_secs: u64,
    /// Quota for the inbox plus outbox. Above it the daemon stops
    /// acknowledging input (the broker keeps it) until space frees.
    #[serde(default = "default_max_store_bytes")]
    pub max_store_bytes: u64,
    /// Crashes a message may interrupt before it goes to the dead letters.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Where messages given up on are reported, with the reason.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Topic filters an MQTT 5 request may name as its response topic; the
    /// default (empty) refuses every response topic, since any client could
    /// otherwise make slmd publish on another consumer's topic. slmd's own
    /// topics and `$` topics are refused whatever this allows.
    #[serde(default = "default_response_topics")]
    pub response_topics: Vec<String>,
    /// The MQTT 5 Maximum Packet Size slmd advertises: the largest message
    /// the broker may send it. Anything up to it is received, and what is
    /// above `max_payload_bytes` gets a `too_large` error result; larger
    /// packets the broker drops without telling the sender.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// Bytes of dedup records (a processed id with its result, to answer a
    /// repeat) kept; the oldest are forgotten first, before the window ends
    /// if this bound is reached.
    #[serde(default = "default_max_dedup_bytes")]
    pub max_dedup_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: default_max_payload(),
            max_text_chars: default_max_text_chars(),
            max_in_flight: default_max_in_flight(),
            dedup_window_secs: default_dedup_window(),
            content_dedup_window_secs: default_content_dedup_window(),
            max_store_bytes: default_max_store_bytes(),
            max_attempts: default_max_attempts(),
            dead_letter_topic: default_dead_letter_topic(),
            response_topics: default_response_topics(),
            max_packet_bytes: default_max_packet_bytes(),
            max_dedup_bytes: default_max_dedup_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
        }
    }
}

/// The Prometheus endpoint; off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `GET /metrics` on, e.g. "127.0.0.1:9108".
    pub listen: Option<std::net::SocketAddr>,
}

/// Model updates: bundle trust, the canary gate, trial and rollback.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatesConfig {
    /// minisign public keys (the base64 line of a `.pub` file) whose
    /// signatures are trusted.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Accept bundles without a signature (development only).
    #[serde(default)]
    pub allow_unsigned: bool,
    /// Control-topic requests (installs, transfer announcements) must be
    /// signed by a trusted key. On by default: anyone who can publish to
    /// the broker could otherwise install a model (docs/SECURITY.md).
    #[serde(default = "yes")]
    pub require_signed_requests: bool,
    /// Entity injection requests (`hermes/injection/perform`) must be
    /// signed like control requests: they change what slmd answers.
    #[serde(default = "yes")]
    pub require_signed_injection: bool,
    /// URL prefixes an http(s) source named over MQTT must start with;
    /// none by default (a network request cannot make slmd fetch a URL).
    #[serde(default)]
    pub url_prefixes: Vec<String>,
    /// Directory a local source named over MQTT must lie under (after
    /// resolving symlinks); none by default (no local path is accepted).
    pub source_dir: Option<PathBuf>,
    /// Largest bundle accepted from the network (download or transfer).
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: u64,
    /// Chunked transfers that may be open at once.
    #[serde(default = "default_max_transfers")]
    pub max_transfers: usize,
    /// A transfer with no chunk for this long is deleted.
    #[serde(default = "default_transfer_expiry")]
    pub transfer_expiry_secs: u64,
    /// Previously active bundles kept for rollback.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Free bytes that must remain on the state file system after an
    /// install.
    #[serde(default = "default_reserve")]
    pub reserve_bytes: u64,
    /// JSONL of `{"task", "text", "label"}` rows a new model must answer.
    pub canary_examples: Option<PathBuf>,
    #[serde(default = "default_canary_accuracy")]
    pub canary_min_accuracy: f64,
    #[serde(default = "default_canary_p95")]
    pub canary_max_p95_ms: f64,
    /// How long a new bundle must run before it is no longer on trial.
    #[serde(default = "default_trial")]
    pub trial_secs: u64,
    /// Starts on trial after which the daemon rolls back (a crash loop).
    #[serde(default = "default_trial_starts")]
    pub max_trial_starts: u32,
    /// Update requests are taken from this topic only; default
    /// `slmd/<client_id>/model/update`. Retained status goes to
    /// `slmd/<client_id>/model/status`.
    pub control_topic: Option<String>,
}

impl UpdatesConfig {
    pub fn control_topic(&self, broker: &BrokerConfig) -> String {
        self.control_topic
            .clone()
            .unwrap_or_else(|| format!("slmd/{}/model/update", broker.client_id))
    }

    pub fn status_topic(&self, broker: &BrokerConfig) -> String {
        format!("slmd/{}/model/status", broker.client_id)
    }

    /// The bounds on chunked transfers over the control topic.
    pub fn transfer_bounds(&self) -> crate::bundle::transfer::Bounds {
        crate::bundle::transfer::Bounds {
            max_size: self.max_bundle_bytes,
            max_transfers: self.max_transfers,
            expiry: std::time::Duration::from_secs(self.transfer_expiry_secs),
            reserve: self.reserve_bytes,
        }
    }

    pub fn trust(&self) -> crate::bundle::Trust {
        crate::bundle::Trust {
            keys: self.trusted_keys.clone(),
            allow_unsigned: self.allow_unsigned,
        }
    }
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_keep() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn default_max_bundle() -> u64 {
    2 << 30
}
fn default_max_transfers() -> usize {
    2
}
fn default_transfer_expiry() -> u64 {
    24 * 3600
}
fn default_reserve() -> u64 {
    64 << 20
}
fn default_canary_accuracy() -> f64 {
    0.9
}
fn default_canary_p95() -> f64 {
    2000.0
}
fn default_trial() -> u64 {
    300
}
fn default_trial_starts() -> u32 {
    3
}

/// What a task does, with the settings only that kind has. In the file it is
/// the task's `kind` key beside those settings' own keys.
#[derive(Debug, Clone, Default)]
pub enum TaskKind {
    /// One label per message.
    #[default]
    Classify,
    /// An intent (a label) and its slots.
    Extract(ExtractConfig),
    /// Sensor readings judged by detectors; an anomaly gets a note whose
    /// cause (one of the labels) the model picks (`[tasks.monitor]`).
    Monitor(crate::monitor::settings::MonitorConfig),
}

/// The keys of an extract task beside the ones every task has.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractConfig {
    /// The slot schema, `{ name, type = "string" | "number" | "enum",
    /// values = [...], open = false }`.
    pub slots: Vec<slmd_engine::schema::SlotSpec>,
    /// What the model is told before an intent's examples.
    #[serde(default = "default_slot_instruction")]
    pub slot_instruction: String,
    /// Sentence templates tried before the model (`[tasks.templates]`).
    #[serde(default)]
    pub templates: Option<TemplatesConfig>,
}

/// An extract task's template stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Intents files in order: a templates manifest's name (fetched into
    /// the model store like a model), a file, or a folder of YAML sentence
    /// files (relative to the configuration file). A later one adds
    /// sentences to an intent and replaces lists and rules of its names.
    pub sources: Vec<String>,
    /// The home in Home Assistant's fixture form (areas, floors, entities
    /// with their domains); the task's `area`, `floor` and `name` slot
    /// values are added to it, injected ones included.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// Whether what the templates miss goes to the model; without it, it
    /// is not recognised.
    #[serde(default = "TemplatesConfig::default_model_stage")]
    pub model_stage: bool,
    /// For a task with labels of its own: `{ intent, slots = {..}, label }`
    /// rules naming template matches by the task's labels (first fitting
    /// rule); a match no rule names goes to the model.
    #[serde(default)]
    pub labels: Vec<slmd_engine::LabelRule>,
    /// Sentences written from each template sentence that join the
    /// intent head's examples (intent only), for the task's labels: the
    /// model stage learns the templates' phrasings (docs/EVAL.md,
    /// "Template stage"). 0: none.
    #[serde(default)]
    pub train_samples: usize,
}

impl TemplatesConfig {
    fn default_model_stage() -> bool {
        true
    }
}

/// The keys that belong to one kind of task.
const KIND_KEYS: [&str; 4] = ["slots", "slot_instruction", "templates", "monitor"];

impl TaskKind {
    /// Takes `kind` and the kind's own keys out of a task's table; a key
    /// of another kind is an error that names the kind it belongs to.
    fn split(table: &mut toml::Table) -> Result<TaskKind, String> {
        let kind = match table.remove("kind") {
            Some(toml::Value::String(k)) => k,
            Some(other) => return Err(format!("`kind` must be a string, not {other}")),
            None => return Err("missing `kind` (classify, extract or monitor)".into()),
        };
        let mut own = toml::Table::new();
        for key in KIND_KEYS {
            if let Some(v) = table.remove(key) {
                own.insert(key.into(), v);
            }
        }
        let misplaced = |allowed: &[&str]| {
            own.keys()
                .find(|k| !allowed.contains(&k.as_str()))
                .map(|k| {
                    let owner = if k == "monitor" { "monitor" } else { "extract" };
                    format!("`{k}` is for {owner} tasks, and this is a {kind} task")
                })
        };
        let allowed: &[&str] = match kind.as_str() {
            "classify" => &[],
            "extract" => &["slots", "slot_instruction", "templates"],
            "monitor" => &["monitor"],
            _ => {
                return Err(format!(
                    "unknown kind {kind:?} (classify, extract or monitor)"
                ))
            }
        };
        if let Some(why) = misplaced(allowed) {
            return Err(why);
        }
        match kind.as_str() {
            "extract" => toml::Value::Table(own).try_into().map(TaskKind::Extract),
            "monitor" => match own.remove("monitor") {
                Some(m) => m.try_into().map(TaskKind::Monitor),
                None => return Err("a monitor task needs a [tasks.monitor] table".into()),
            },
            _ => Ok(TaskKind::Classify),
        }
        .map_err(|e| e.message().to_owned())
    }
}

/// Every task's table: its `kind` and that kind's keys become the typed
/// [`TaskKind`], the rest the task's common keys.
fn tasks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TaskConfig>, D::Error> {
    use serde::de::Error;
    let tables = Vec::<toml::Table>::deserialize(d)?;
    let mut out = Vec::with_capacity(tables.len());
    for (i, mut table) in tables.into_iter().enumerate() {
        let at = match table.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("tasks[{i}] ({name:?})"),
            None => format!("tasks[{i}]"),
        };
        let kind =
            TaskKind::split(&mut table).map_err(|e| D::Error::custom(format!("{at}: {e}")))?;
        let mut task: TaskConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| D::Error::custom(format!("{at}: {}", e.message())))?;
        task.kind = kind;
        out.push(task);
    }
    Ok(out)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// Set from the task's `kind` key and that kind's own keys ([`tasks`]).
    #[serde(skip)]
    pub kind: TaskKind,
    /// `head` (default) or `label_scoring`.
    #[serde(default)]
    pub strategy: slmd_engine::Strategy,
    /// MQTT topic filters (`+` and `#` allowed) this task consumes.
    pub topics: Vec<String>,
    pub output_topic: String,
    /// Where error results go; default `<output_topic>/error`.
    pub error_topic: Option<String>,
    /// What the task is, told to the model before the input (its KV is
    /// computed once and reused for every message).
    #[serde(default = "default_instruction")]
    pub instruction: String,
    /// Words after the input where the model's reply would begin, read by
    /// the head's last-token features. Empty by default: every cue token
    /// costs per-message time (a 7-token cue doubles latency for no
    /// measured gain; docs/EVAL.md).
    #[serde(default = "default_cue")]
    pub cue: String,
    /// Weight of the text's own word and character n-grams beside the
    /// model's hidden state in the head (0 turns them off).
    #[serde(default = "default_lexical_weight")]
    pub lexical_weight: f32,
    /// Weight of the command concepts (groups of words that say the same
    /// thing to a device, [`slmd_engine::concepts`]) in the head (0 turns
    /// them off).
    #[serde(default = "default_concept_weight")]
    pub concept_weight: f32,
    /// The task's own concept groups, name -> words, replacing the built-in
    /// English ones (for another language or domain).
    pub concepts: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// Below this confidence the result says "not recognised" (and still
    /// lists the best labels). 0 never abstains.
    #[serde(default)]
    pub abstain_below: f32,
    /// A label whose examples are things the task should refuse (out of
    /// scope); when it wins the result is "not recognised".
    pub reject_label: Option<String>,
    /// An input less like the task's examples than this share of the
    /// examples themselves is "not recognised" (out of scope, with no
    /// out-of-scope examples needed; [`slmd_engine::novelty`]). 0 turns
    /// it off.
    #[serde(default = "default_novelty_quantile")]
    pub novelty_quantile: f32,
    #[serde(default)]
    pub labels: Vec<LabelConfig>,
    /// JSONL file(s) of `{"text": ..., "intent": ..., "slots": {...}}`
    /// rows adding examples to the labels (rows whose intent is not a label
    /// are an error): a path or a list of paths. Rows with `slots` are
    /// shown to the model as extraction examples of their intent.
    #[serde(default, deserialize_with = "one_or_many")]
    pub examples_file: Vec<PathBuf>,
    /// What the task's messages look like on the wire: slmd's own JSON
    /// (default) or the Hermes protocol of Rhasspy and Snips
    /// ([`crate::hermes`]).
    #[serde(default)]
    pub protocol: Protocol,
    /// Hermes tasks: also announce every recognised query on
    /// `hermes/nlu/intentParsed`, as Rhasspy's own NLU services do (for
    /// listeners that watch the NLU rather than the intents).
    #[serde(default)]
    pub hermes_intent_parsed: bool,
    /// Safety policy for commands that act on the world: each result gets
    /// an `action` (execute, confirm or refuse) ([`crate::policy`]).
    pub policy: Option<crate::policy::PolicyConfig>,
    /// Doubtful answers go to a larger model ([`crate::escalate`]).
    pub escalate: Option<crate::escalate::EscalateConfig>,
}

/// A task's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `{"id", "text"}` or plain text in; [`crate::payload::TaskResult`] out.
    #[default]
    Slmd,
    /// `hermes/nlu/query` in; `<output_topic>/<intentName>` (set
    /// `output_topic = "hermes/intent"`), `hermes/nlu/intentNotRecognized`
    /// and `hermes/error/nlu` out.
    Hermes,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelConfig {
    pub name: String,
    pub description: Option<String>,
    #[serde(default)]
    pub examples: Vec<String>,
    /// Extract tasks: the slots this intent may fill (default: those its
    /// annotated examples fill; all when it has none).
    pub slots: Option<Vec<String>>,
}

/// A path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(ps) => ps,
    })
}

fn default_manifests() -> PathBuf {
    PathBuf::from("/usr/share/slmd/models")
}
pub fn default_context() -> u32 {
    512
}
fn default_head_depth() -> f32 {
    slmd_engine::HEAD_DEPTH
}
fn default_head_requantize() -> bool {
    slmd_engine::HEAD_REQUANTIZE
}

fn default_novelty_quantile() -> f32 {
    slmd_engine::NOVELTY_QUANTILE
}

fn default_generate_requantize() -> bool {
    slmd_engine::GENERATE_REQUANTIZE
}

pub fn default_extract_context() -> u32 {
    8192
}
fn default_slot_instruction() -> String {
    slmd_engine::extract::DEFAULT_INSTRUCTION.into()
}
fn default_max_payload() -> usize {
    16 * 1024
}
fn default_max_text_chars() -> usize {
    1000
}
fn default_max_in_flight() -> usize {
    16
}
fn default_dedup_window() -> u64 {
    24 * 3600
}
fn default_content_dedup_window() -> u64 {
    10
}
fn default_max_store_bytes() -> u64 {
    64 << 20
}
fn default_max_packet_bytes() -> u32 {
    16 << 20
}
fn default_max_dedup_bytes() -> u64 {
    8 << 20
}
fn default_cache_bytes() -> u64 {
    8 << 20
}
fn default_max_attempts() -> u32 {
    3
}
fn default_dead_letter_topic() -> String {
    "slmd/dead-letter".into()
}
fn default_response_topics() -> Vec<String> {
    Vec::new()
}
fn default_log_level() -> String {
    "info".into()
}
pub fn default_instruction() -> String {
    "You are a voice assistant. Classify the intent of the user's command.".into()
}
pub fn default_cue() -> String {
    String::new()
}
pub fn default_lexical_weight() -> f32 {
    1.0
}
pub fn default_concept_weight() -> f32 {
    1.0
}

impl TaskConfig {
    /// An extract task's slots; none for the other kinds.
    pub fn slots(&self) -> &[slmd_engine::schema::SlotSpec] {
        match &self.kind {
            TaskKind::Extract(e) => &e.slots,
            _ => &[],
        }
    }

    /// A monitor task's settings.
    pub fn monitor(&self) -> Option<&crate::monitor::settings::MonitorConfig> {
        match &self.kind {
            TaskKind::Monitor(m) => Some(m),
            _ => None,
        }
    }

    pub fn error_topic(&self) -> String {
        self.error_topic
            .clone()
            .unwrap_or_else(|| match self.protocol {
                Protocol::Slmd => format!("{}/error", self.output_topic),
                Protocol::Hermes => crate::hermes::ERROR_TOPIC.into(),
            })
    }
}

impl Config {
    /// Reads, parses and validates; the one way a config enters the daemon.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = config.base_dir.clone();
        for e in config.tasks.iter_mut().filter_map(|t| t.escalate.as_mut()) {
            if let Some(key) = &mut e.api_key_file {
                *key = base.join(&*key);
            }
        }
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// All examples of a task: each label's inline examples and description,
    /// then the rows of its examples files.
    pub fn examples_of(&self, task: &TaskConfig) -> Result<Vec<Example>, ExamplesError> {
        let mut out = Vec::new();
        for label in &task.labels {
            let texts = label.examples.iter().chain(label.description.iter());
            out.extend(texts.map(|t| Example {
                text: t.clone(),
                label: label.name.clone(),
                slots: None,
            }));
        }
        for file in &task.examples_file {
            let rows = read_jsonl(&self.resolve(file))?;
            out.extend(rows.into_iter().map(Example::from));
        }
        Ok(out)
    }

    /// Resolves a path from the file relative to the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Settings that are valid but open the device to anyone who can
    /// publish to the broker (docs/SECURITY.md); `check-config` prints them
    /// and the daemon logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let u = &self.updates;
        let mut w = Vec::new();
        if !u.require_signed_requests {
            w.push(
                "updates.require_signed_requests = false: any client of the broker may install \
                 (signed) bundles over the control topic"
                    .to_owned(),
            );
        }
        if !u.require_signed_injection && self.tasks.iter().any(|t| t.protocol == Protocol::Hermes)
        {
            w.push(
                "updates.require_signed_injection = false: any client of the broker may change \
                 the entities slmd recognises (restrict hermes/injection/perform in the broker's ACL)"
                    .to_owned(),
            );
        }
        if u.allow_unsigned {
            w.push("updates.allow_unsigned = true: bundles need no signature".to_owned());
        }
        if u.url_prefixes.iter().any(|p| p.starts_with("http://")) {
            w.push(
                "updates.url_prefixes: plain http can be changed in transit (bundles are still \
                 verified by signature)"
                    .to_owned(),
            );
        }
        if self.limits.response_topics.iter().any(|f| f == "#") {
            w.push(
                "limits.response_topics allows \"#\": any MQTT 5 request may make slmd publish \
                 on another consumer's topic"
                    .to_owned(),
            );
        }
        if self.broker.password.is_some() {
            w.push(
                "broker.password is in the config file: prefer password_file or \
                 password_credential"
                    .to_owned(),
            );
        }
        w
    }

    /// The broker password from wherever the config says it is.
    pub fn broker_password(&self) -> Result<Option<String>, (PathBuf, std::io::Error)> {
        self.broker.password(&self.base_dir)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.state.dir)
    }

    pub fn task(&self, name: &str) -> Option<&TaskConfig> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// Every problem in the file, each with its key path; empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if self.broker.client_id.trim().is_empty() {
            p.add("broker.client_id", "must not be empty");
        }
        if self.broker.host.trim().is_empty() {
            p.add("broker.host", "must not be empty");
        }
        if self.broker.port == 0 {
            p.add("broker.port", "must be 1-65535");
        }
        let b = &self.broker;
        let passwords = [
            b.password.is_some(),
            b.password_file.is_some(),
            b.password_credential.is_some(),
        ];
        if b.username.is_none() && passwords.contains(&true) {
            p.add("broker.password", "set without broker.username");
        }
        if passwords.iter().filter(|x| **x).count() > 1 {
            p.add(
                "broker.password",
                "set one of password, password_file and password_credential",
            );
        }
        if let Some(name) = &b.password_credential {
            if name.is_empty() || name.contains('/') {
                p.add(
                    "broker.password_credential",
                    "a credential name, without '/'",
                );
            }
        }
        if let Err(why) = slmd_core::topic::check_name(&self.broker.status_topic()) {
            p.add("broker.status_topic", why);
        }
        if self.broker.max_inflight == 0 {
            p.add("broker.max_inflight", "must be at least 1");
        }
        match (&self.model.name, &self.model.path) {
            (None, None) => p.add("model", "set either model.name or model.path"),
            (Some(_), Some(_)) => p.add("model", "set model.name or model.path, not both"),
            _ => {}
        }
        if self.model.nice.is_some_and(|n| !(-20..=19).contains(&n)) {
            p.add("model.nice", "must be between -20 and 19");
        }
        if !(self.model.head_depth > 0.0 && self.model.head_depth <= 1.0) {
            p.add("model.head_depth", "must be above 0 and at most 1");
        }
        if !(64..=32768).contains(&self.model.context_size) {
            p.add("model.context_size", "must be between 64 and 32768");
        }
        if self.limits.max_payload_bytes == 0 {
            p.add("limits.max_payload_bytes", "must be at least 1");
        }
        for (i, k) in self.updates.trusted_keys.iter().enumerate() {
            if minisign::PublicKey::from_base64(k.trim()).is_err() {
                p.add(
                    format!("updates.trusted_keys[{i}]"),
                    "not a minisign public key (the base64 line of a .pub file)",
                );
            }
        }
        for (i, prefix) in self.updates.url_prefixes.iter().enumerate() {
            let scheme = ["https://", "http://"]
                .iter()
                .find(|s| prefix.starts_with(*s));
            // The host must be whole: "https://host" would also match
            // "https://host.example.org".
            let host_closed = scheme.is_some_and(|s| prefix[s.len()..].contains('/'));
            if !host_closed {
                p.add(
                    format!("updates.url_prefixes[{i}]"),
                    "an http(s) URL with a path, e.g. \"https://updates.example.org/slmd/\"",
                );
            }
        }
        if self.updates.max_transfers == 0 {
            p.add("updates.max_transfers", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.updates.canary_min_accuracy) {
            p.add("updates.canary_min_accuracy", "must be between 0 and 1");
        }
        if let Some(file) = &self.updates.canary_examples {
            let path = self.resolve(file);
            if !path.is_file() {
                p.add(
                    "updates.canary_examples",
                    format!("{} is not a readable file", path.display()),
                );
            }
        }
        if let Err(why) = slmd_core::topic::check_name(&self.updates.control_topic(&self.broker)) {
            p.add("updates.control_topic", why);
        }
        if self.limits.max_in_flight == 0 {
            p.add("limits.max_in_flight", "must be at least 1");
        }
        if self.limits.max_attempts == 0 {
            p.add("limits.max_attempts", "must be at least 1");
        }
        // Room for at least one message of the largest size.
        if self.limits.max_store_bytes < 4 * self.limits.max_payload_bytes as u64 {
            p.add(
                "limits.max_store_bytes",
                "must be at least 4 x limits.max_payload_bytes",
            );
        }
        if (self.limits.max_packet_bytes as u64) < self.limits.max_payload_bytes as u64 + 1024 {
            p.add(
                "limits.max_packet_bytes",
                "must be at least limits.max_payload_bytes + 1024 (room for the topic and \
                 properties of the largest accepted message)",
            );
        }
        if let Err(e) = slmd_core::topic::check_name(&self.limits.dead_letter_topic) {
            p.add("limits.dead_letter_topic", e);
        }
        for (i, f) in self.limits.response_topics.iter().enumerate() {
            if let Err(why) = slmd_core::topic::check_filter(f) {
                p.add(format!("limits.response_topics[{i}]"), why);
            }
        }
        if let Some(tls) = &self.broker.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                p.add(
                    "broker.tls",
                    "client_cert and client_key go together (set both or neither)",
                );
            }
            for (key, file) in [
                ("ca_file", Some(&tls.ca_file)),
                ("client_cert", tls.client_cert.as_ref()),
                ("client_key", tls.client_key.as_ref()),
            ] {
                if let Some(file) = file {
                    let path = self.resolve(file);
                    if !path.is_file() {
                        p.add(
                            format!("broker.tls.{key}"),
                            format!("{} is not a readable file", path.display()),
                        );
                    }
                }
            }
        }
        if self.log.level.parse::<log::LevelFilter>().is_err() {
            p.add(
                "log.level",
                format!(
                    "unknown level {:?} (error, warn, info, debug, trace, off)",
                    self.log.level
                ),
            );
        }
        if self.tasks.is_empty() {
            p.add("tasks", "at least one task is needed");
        }
        let mut names = HashSet::new();
        for (i, task) in self.tasks.iter().enumerate() {
            let key = format!("tasks[{i}]");
            if task.name.trim().is_empty() {
                p.add(format!("{key}.name"), "must not be empty");
            } else if !names.insert(task.name.as_str()) {
                p.add(
                    format!("{key}.name"),
                    format!("duplicate task {:?}", task.name),
                );
            }
            self.validate_task(&key, task, &mut p);
        }
        p.0
    }

    fn validate_task(&self, key: &str, task: &TaskConfig, p: &mut Problems) {
        if let Some(e) = &task.escalate {
            for (field, why) in e.problems() {
                p.add(format!("{key}.escalate.{field}"), why);
            }
            if matches!(task.kind, TaskKind::Monitor(_)) {
                p.add(
                    format!("{key}.escalate"),
                    "a monitor task does not escalate",
                );
            }
            // A request read back as input would escalate itself forever; a
            // reply topic a task consumes would take its messages.
            for (field, topic) in [("topic", &e.topic), ("reply_topic", &e.reply_topic)] {
                let Some(topic) = topic else { continue };
                let consumer = self
                    .tasks
                    .iter()
                    .find(|t| t.topics.iter().any(|f| slmd_core::topic::matches(f, topic)));
                if let Some(t) = consumer {
                    p.add(
                        format!("{key}.escalate.{field}"),
                        format!("{topic} is an input topic of task {:?}", t.name),
                    );
                }
            }
        }
        if task.hermes_intent_parsed && task.protocol != Protocol::Hermes {
            p.add(
                format!("{key}.hermes_intent_parsed"),
                "needs protocol = \"hermes\"",
            );
        }
        if task.topics.is_empty() {
            p.add(
                format!("{key}.topics"),
                "at least one topic filter is needed",
            );
        }
        for (j, t) in task.topics.iter().enumerate() {
            if let Err(why) = slmd_core::topic::check_filter(t) {
                p.add(format!("{key}.topics[{j}]"), why);
            }
        }
        for (field, topic) in [
            ("output_topic", Some(task.output_topic.clone())),
            ("error_topic", task.error_topic.clone()),
        ] {
            if let Some(topic) = topic {
                if let Err(why) = slmd_core::topic::check_name(&topic) {
                    p.add(format!("{key}.{field}"), why);
                } else if task
                    .topics
                    .iter()
                    .any(|f| slmd_core::topic::matches(f, &topic))
                {
                    p.add(
                        format!("{key}.{field}"),
                        "matches the task's own input topics (results would loop back in)",
                    );
                }
            }
        }
        if task.labels.len() < 2 {
            p.add(
                format!("{key}.labels"),
                "a classify task needs at least two labels",
            );
        }
        self.validate_slots(key, task, p);
        self.validate_policy(key, task, p);
        if !(0.0..=1.0).contains(&task.abstain_below) {
            p.add(format!("{key}.abstain_below"), "must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&task.novelty_quantile) {
            p.add(format!("{key}.novelty_quantile"), "must be between 0 and 1");
        }
        for (name, weight) in [
            ("lexical_weight", task.lexical_weight),
            ("concept_weight", task.concept_weight),
        ] {
            if !(0.0..=100.0).contains(&weight) {
                p.add(format!("{key}.{name}"), "must be between 0 and 100");
            }
        }
        for (name, words) in task.concepts.iter().flatten() {
            let single = |w: &String| !w.is_empty() && w.chars().all(char::is_alphanumeric);
            if words.is_empty() || !words.iter().all(single) {
                p.add(
                    format!("{key}.concepts.{name}"),
                    "must list single words (letters and digits only)",
                );
            }
        }
        if let Some(r) = &task.reject_label {
            if !task.labels.iter().any(|l| &l.name == r) {
                p.add(
                    format!("{key}.reject_label"),
                    format!("{r:?} is not one of the task's labels"),
                );
            }
        }
        let mut seen = HashSet::new();
        for (j, label) in task.labels.iter().enumerate() {
            if label.name.trim().is_empty() {
                p.add(format!("{key}.labels[{j}].name"), "must not be empty");
            } else if !seen.insert(label.name.as_str()) {
                p.add(
                    format!("{key}.labels[{j}].name"),
                    format!("duplicate label {:?}", label.name),
                );
            }
        }
        // One read of the examples file serves both checks.
        match self.examples_of(task) {
            Err(e) => p.add(format!("{key}.examples_file"), e.to_string()),
            Ok(examples) => {
                for e in examples.iter().filter(|e| !seen.contains(e.label.as_str())) {
                    p.add(
                        format!("{key}.examples_file"),
                        format!("intent {:?} is not one of the task's labels", e.label),
                    );
                }
                for (j, label) in task.labels.iter().enumerate() {
                    if !examples.iter().any(|e| e.label == label.name) {
                        p.add(
                            format!("{key}.labels[{j}].examples"),
                            format!("label {:?} has no examples", label.name),
                        );
                    }
                }
            }
        }
    }
}

impl Config {
    fn validate_policy(&self, key: &str, task: &TaskConfig, p: &mut Problems) {
        let Some(policy) = &task.policy else { return };
        let labels: Vec<&str> = task.labels.iter().map(|l| l.name.as_str()).collect();
        for (k, message) in policy.problems(&format!("{key}.policy"), &labels) {
            p.add(k, message);
        }
    }

    fn validate_slots(&self, key: &str, task: &TaskConfig, p: &mut Problems) {
        match &task.kind {
            TaskKind::Monitor(m) => {
                for (k, message) in m.problems(&format!("{key}.monitor")) {
                    p.add(k, message);
                }
            }
            TaskKind::Extract(e) if e.slots.is_empty() => {
                p.add(format!("{key}.slots"), "an extract task needs slots");
            }
            TaskKind::Extract(e) => {
                if let Err(e) = slmd_engine::schema::validate_schema(&e.slots) {
                    p.add(format!("{key}.slots"), e.to_string());
                }
            }
            TaskKind::Classify => {}
        }
        for (j, label) in task.labels.iter().enumerate() {
            for name in label.slots.iter().flatten() {
                if !task.slots().iter().any(|s| &s.name == name) {
                    p.add(
                        format!("{key}.labels[{j}].slots"),
                        format!("{name:?} is not one of the task's slots"),
                    );
                }
            }
        }
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config with one task of two labels; `task` adds lines to it.
    pub(crate) fn config(task: &str) -> Config {
        toml::from_str(&task_text(task)).unwrap()
    }

    /// The text of [`config`]'s file.
    fn task_text(task: &str) -> String {
        format!(
            r#"
            [broker]
            client_id = "t"
            [state]
            dir = "/tmp/x"
            [model]
            path = "/tmp/m.gguf"
            [[tasks]]
            name = "f"
            topics = ["f/+/reading"]
            output_topic = "f/note"
            labels = [{{ name = "a", examples = ["x"] }}, {{ name = "b", examples = ["y"] }}]
            {task}
            "#
        )
    }

    fn keys(c: &Config) -> Vec<String> {
        c.validate().into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn the_defaults_are_the_safe_ones_and_opting_out_is_warned_about() {
        let c = config(r#"kind = "classify""#);
        let u = &c.updates;
        assert!(u.require_signed_requests && u.require_signed_injection);
        assert!(u.url_prefixes.is_empty() && u.source_dir.is_none());
        assert!(c.limits.response_topics.is_empty());
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let open: Config = toml::from_str(&format!(
            "{}\n[updates]\nrequire_signed_requests = false\nallow_unsigned = true\n",
            "[broker]\nclient_id = \"t\"\npassword = \"p\"\nusername = \"u\"\n\
             [state]\ndir = \"/x\"\n[model]\npath = \"/m\"\n[limits]\nresponse_topics = [\"#\"]"
        ))
        .unwrap();
        let w = open.warnings().join("\n");
        for key in [
            "require_signed_requests",
            "allow_unsigned",
            "response_topics",
            "broker.password",
        ] {
            assert!(w.contains(key), "{key}: {w}");
        }
        // A prefix must close the host name.
        let mut c = config(r#"kind = "classify""#);
        c.updates.url_prefixes = vec!["https://updates.example.org".into(), "https://h/d/".into()];
        assert_eq!(keys(&c), ["updates.url_prefixes[0]"]);
    }

    #[test]
    fn the_password_comes_from_a_file_or_a_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let mut c = config(r#"kind = "classify""#);
        c.broker.username = Some("u".into());
        c.broker.password_file = Some(dir.path().join("pw"));
        assert_eq!(c.broker_password().unwrap().as_deref(), Some("s3cret"));
        c.broker.password = Some(Secret("x".into()));
        assert_eq!(keys(&c), ["broker.password"]);
        c.broker.password = None;
        c.broker.password_file = Some(dir.path().join("missing"));
        assert!(c.broker_password().is_err());
        c.broker.password_file = None;
        c.broker.password_credential = Some("a/b".into());
        assert_eq!(keys(&c), ["broker.password_credential"]);
    }

    #[test]
    fn a_kinds_own_keys_belong_to_that_kind_only() {
        let parse = |kind: &str, extra: &str| {
            let text = format!("{}\nkind = \"{kind}\"\n{extra}", task_text(""));
            toml::from_str::<Config>(&text).map_err(|e| e.message().to_owned())
        };
        let monitor = "[tasks.monitor]\ndetectors = [{ kind = \"zscore\", k = 4.0 }]";
        let slots = "slots = [{ name = \"area\", type = \"string\" }]";
        let err = |kind: &str, extra: &str| parse(kind, extra).unwrap_err();
        assert!(keys(&parse("monitor", monitor).unwrap()).is_empty());
        assert!(keys(&parse("extract", slots).unwrap()).is_empty());
        assert_eq!(
            err("monitor", ""),
            "tasks[0] (\"f\"): a monitor task needs a [tasks.monitor] table"
        );
        assert_eq!(
            err("classify", monitor),
            "tasks[0] (\"f\"): `monitor` is for monitor tasks, and this is a classify task"
        );
        assert_eq!(
            err("monitor", &format!("{slots}\n{monitor}")),
            "tasks[0] (\"f\"): `slots` is for extract tasks, and this is a monitor task"
        );
        assert!(err("extract", "").contains("missing field `slots`"));
        assert!(err("sort", "").contains("unknown kind \"sort\""));
        assert!(err("classify", "slotz = 1").contains("unknown field `slotz`"));
    }

    #[test]
    fn monitor_problems_carry_the_task_key() {
        let c = config(
            "kind = \"monitor\"\n[tasks.monitor]\nmin_samples = 1\ndetectors = [{ kind = \"rate\", max_per_sec = 0.0 }]",
        );
        assert_eq!(
            keys(&c),
            [
                "tasks[0].monitor.min_samples",
                "tasks[0].monitor.detectors[0].max_per_sec"
            ]
        );
    }

    #[test]
    fn escalation_topics_may_not_be_input_topics_and_a_key_file_must_exist() {
        let c = config(
            "kind = \"classify\"\n[tasks.escalate]\nname = \"up\"\ntopic = \"f/up/reading\"\nreply_topic = \"up/reply\"",
        );
        assert_eq!(keys(&c), ["tasks[0].escalate.topic"]);
        let c = config(
            "kind = \"classify\"\n[tasks.escalate]\nname = \"up\"\nurl = \"http://h/v1\"\napi_key_file = \"/nonexistent/key\"",
        );
        assert_eq!(keys(&c), ["tasks[0].escalate.api_key_file"]);
    }

    #[test]
    fn a_password_is_never_in_the_debug_output() {
        let mut c = config("kind = \"classify\"");
        c.broker.password = Some(Secret("hunter2-secret".into()));
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Secret(..)"));
    }

    #[test]
    fn concept_groups_must_list_single_words_and_weights_stay_in_range() {
        let c = config("kind = \"classify\"\nconcepts = { aus = [\"aus\", \"ausschalten\"] }");
        assert!(keys(&c).is_empty(), "{:?}", c.validate());
        assert_eq!(c.tasks[0].concept_weight, default_concept_weight());
        let c = config(
            "kind = \"classify\"\nconcept_weight = -1.0\nconcepts = { aus = [\"mach aus\"], an = [] }",
        );
        assert_eq!(
            keys(&c),
            [
                "tasks[0].concept_weight",
                "tasks[0].concepts.an",
                "tasks[0].concepts.aus"
            ]
        );
    }
}
