//! The inference engine: one named OS thread owns the llama.cpp model and
//! context; everything else talks to it through a bounded queue and gets each
//! answer back on a oneshot. The async runtime never blocks on inference.
//!
//! At start-up the thread loads the GGUF, embeds every task's labelled
//! examples and trains one [`head::Head`] per task. A request is then one
//! batched decode plus a dot product per label: the answer is always one of
//! the task's labels, with a probability for each.
//!
//! Requests that arrive while a batch is being decoded are taken together
//! (up to [`embed::MAX_SEQUENCES`]) into the next batch, one sequence each.
//!
//! For `extract` tasks the recognised intent's slots are then generated in
//! one more batch, under the grammar of the intent's slot schema
//! ([`extract`], [`schema`]), and grounded in the input ([`ground`]) and
//! the query's context ([`context`]); an intent whose examples grounding
//! alone reads is not generated for ([`ground::Grounding::reads_all`]).
//!
//! What start-up derives is kept for the next one: the cut and Q4_0 model
//! files and trained heads in the head cache, and the decoded intent
//! prompts ([`kv_files`]); while it works it reports each step with the time
//! left ([`progress`]).

pub mod cascade;
pub mod concepts;
pub mod context;
pub mod embed;
pub mod extract;
pub mod ground;
pub mod head;
pub mod kv_files;
pub mod lexical;
pub mod models;
pub mod novelty;
pub mod number_slots;
pub mod numbers;
pub mod progress;
pub mod schema;
pub mod scorer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use cascade::{LabelRule, Stage, TemplateStage};

use crate::models::gguf::Description;
use crate::models::{requant, PromptFormat};
use embed::{DecodeOptions, Embedder, States, Template};
use extract::{Generator, IntentPrompt};
use head::{Head, TrainOptions};
pub use progress::Progress;
use schema::{Slot, SlotSpec};
use slmd_core::examples::Example;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("cannot load model {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot create llama.cpp context: {0}")]
    Context(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("input is {tokens} tokens; the context holds {limit}")]
    TooLong { tokens: usize, limit: usize },
    #[error("no task named {0:?}")]
    UnknownTask(String),
    #[error("task {task:?}: {message}")]
    Training { task: String, message: String },
    #[error("the inference thread has stopped")]
    Stopped,
}

/// What identifies the model in every result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub sha256: String,
    /// The bundle's version, when the model came from a bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// How a classify task picks its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Strategy {
    /// A logistic-regression head over the model's hidden states and the
    /// text's n-grams, trained on the task's examples (fast, most accurate).
    #[default]
    Head,
    /// Each label scored as the model's reply under a prompt with the
    /// instruction and a few examples ([`scorer`]).
    LabelScoring,
}

/// What the engine needs to know about a task.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub strategy: Strategy,
    /// What the task is, said to the model before the input.
    pub instruction: String,
    /// Words after the input, where the reply would start.
    pub cue: String,
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
    /// Weight of the text's own n-gram features beside the hidden state
    /// (0 turns them off).
    pub lexical_weight: f32,
    /// Weight of the command-concept features ([`concepts`]; 0 turns them
    /// off) and the groups they count.
    pub concept_weight: f32,
    pub concepts: concepts::Concepts,
    /// Below this confidence the answer is "not recognised".
    pub abstain_below: f32,
    /// A label that means "none of the others" (out of scope): predicting
    /// it is also "not recognised".
    pub reject_label: Option<String>,
    /// An input less like the examples than this share of the examples
    /// themselves is "not recognised" ([`novelty`]); 0 turns it off.
    pub novelty_quantile: f32,
    /// Set for `extract` tasks: the labels are intents with slots.
    pub extract: Option<ExtractSpec>,
    /// Sentence templates tried before the model ([`cascade`]).
    pub templates: Option<TemplateStage>,
}

/// What an extract task adds to classification: its slots.
#[derive(Debug, Clone)]
pub struct ExtractSpec {
    /// Every slot of the task, in the order replies list them.
    pub slots: Vec<SlotSpec>,
    /// Said to the model before each intent's slots and examples.
    pub instruction: String,
    /// Per label (in the task's label order), the slots it may fill; `None`
    /// takes the slots its annotated examples fill (all of them when it has
    /// no annotated examples).
    pub label_slots: Vec<Option<Vec<String>>>,
}

impl ExtractSpec {
    /// Each label's prompt; `None` for an intent without slots (its answer
    /// needs no generation).
    pub fn prompts(&self, format: PromptFormat, task: &TaskSpec) -> Vec<Option<IntentPrompt>> {
        let schema = ground::with_example_values(&self.slots, &task.examples);
        let grounding = Arc::new(ground::Grounding::learn(&schema, &task.examples));
        task.labels
            .iter()
            .enumerate()
            .map(|(i, label)| {
                let annotated: Vec<&Example> = task
                    .examples
                    .iter()
                    .filter(|e| &e.label == label && e.slots.is_some())
                    .collect();
                let names: Vec<String> = match self.label_slots.get(i).cloned().flatten() {
                    Some(names) => names,
                    None if annotated.is_empty() => schema.iter().map(|s| s.name.clone()).collect(),
                    None => annotated
                        .iter()
                        .flat_map(|e| e.slots.iter().flat_map(|m| m.keys().cloned()))
                        .collect(),
                };
                let slots: Vec<SlotSpec> = schema
                    .iter()
                    .filter(|s| names.contains(&s.name))
                    .cloned()
                    .collect();
                (!slots.is_empty()).then(|| {
                    let declared: Vec<SlotSpec> = self
                        .slots
                        .iter()
                        .filter(|s| names.contains(&s.name))
                        .cloned()
                        .collect();
                    let generate = !grounding.reads_all(&declared, &annotated);
                    IntentPrompt {
                        generate,
                        ..IntentPrompt::new(
                            format,
                            &self.instruction,
                            label,
                            slots,
                            grounding.clone(),
                            &annotated,
                        )
                    }
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_path: PathBuf,
    pub model: ModelInfo,
    pub format: PromptFormat,
    pub context_size: u32,
    /// 0: one per available CPU.
    pub threads: u32,
    /// Requests queued for the thread; senders wait when it is full.
    pub queue: usize,
    /// Trained heads are kept here, keyed by everything they depend on, so
    /// a restart (after a crash, say) does not embed every example again.
    pub head_cache: Option<PathBuf>,
    pub decode: DecodeOptions,
    /// Most context of the slot generator (intent prompts and replies); at
    /// least [`extract::MIN_CONTEXT`]. Only allocated when a task extracts,
    /// and then only as large as its prompts need when they all fit.
    pub extract_context: u32,
    /// Share of the model's transformer blocks the classifier head reads
    /// (1.0: all). Below 1, heads read the model cut to its first blocks
    /// ([`crate::models::gguf`]), derived once next to the head cache.
    pub head_depth: f32,
    /// When the model's block weights are Q4_1, heads read their cut model
    /// requantised to Q4_0, which llama.cpp multiplies faster
    /// ([`crate::models::requant`]).
    pub head_requantize: bool,
    /// Likewise for the whole model, which generation and label scoring
    /// read: a Q4_0 copy is derived into the head cache.
    pub generate_requantize: bool,
    pub tuning: Tuning,
    /// Where start-up says what it is doing.
    pub progress: Progress,
}

/// The head depth used unless configured: measured best on SmolLM2-135M
/// (docs/EVAL.md, "Head depth").
pub const HEAD_DEPTH: f32 = 0.8;

/// Whether a Q4_1 model's cut for heads is requantised to Q4_0 unless
/// configured otherwise (docs/EVAL.md, "Q4_0 heads": same accuracy, a
/// quarter less time).
pub const HEAD_REQUANTIZE: bool = true;

/// Whether generation reads a Q4_0 copy of a Q4_1 model unless configured
/// otherwise: no, as the copy's slot F1 moves by dataset (HA +0.01, SNIPS
/// +0.02, automotive -0.09; docs/EVAL.md), so a configuration opts in.
pub const GENERATE_REQUANTIZE: bool = false;

/// A task's [`TaskSpec::novelty_quantile`] unless configured otherwise:
/// the least typical 1% of the examples set the bar (docs/EVAL.md, "Out of
/// scope": on the HWU64 dev rows it rejects 89 of 100 CLINC out-of-scope
/// queries and costs 0.6 points of in-scope accuracy).
pub const NOVELTY_QUANTILE: f32 = 0.01;

/// How the inference thread and the model's memory are treated by the OS.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Lock the model's pages in RAM (no paging under memory pressure).
    pub mlock: bool,
    /// Nice value of the inference thread alone (MQTT stays responsive).
    pub nice: Option<i32>,
    /// CPUs the inference thread may run on; empty means any.
    pub cpus: Vec<usize>,
}

impl Tuning {
    /// Applies `nice` and `cpus` to the calling thread.
    fn apply_to_this_thread(&self) -> Result<(), EngineError> {
        let tid = nix::unistd::gettid();
        if !self.cpus.is_empty() {
            let mut set = nix::sched::CpuSet::new();
            for &cpu in &self.cpus {
                set.set(cpu)
                    .map_err(|e| EngineError::Backend(format!("cpu {cpu}: {e}")))?;
            }
            nix::sched::sched_setaffinity(tid, &set)
                .map_err(|e| EngineError::Backend(format!("CPU affinity {:?}: {e}", self.cpus)))?;
        }
        if let Some(nice) = self.nice {
            // On Linux a thread id names one thread for setpriority(2).
            // SAFETY: a plain syscall with integer arguments.
            let rc =
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t, nice) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(EngineError::Backend(format!("nice {nice}: {e}")));
            }
        }
        Ok(())
    }
}

/// Tokens the inference thread put through the model, and the time it was
/// busy doing so, since the process started (across engine restarts).
pub struct Throughput {
    tokens: AtomicU64,
    busy_us: AtomicU64,
}

pub static THROUGHPUT: Throughput = Throughput {
    tokens: AtomicU64::new(0),
    busy_us: AtomicU64::new(0),
};

impl Throughput {
    fn record(&self, tokens: usize, busy: std::time::Duration) {
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.busy_us
            .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
    }

    /// Tokens per second of busy time; 0 before the first request.
    pub fn tokens_per_second(&self) -> f64 {
        let us = self.busy_us.load(Ordering::Relaxed);
        if us == 0 {
            return 0.0;
        }
        self.tokens.load(Ordering::Relaxed) as f64 * 1e6 / us as f64
    }
}

/// A classification: every label with its probability, best first, and the
/// task's decision.
#[derive(Debug, Clone)]
pub struct Scores {
    pub ranked: Vec<(String, f32)>,
    /// The recognised label; `None` when the best label is below the task's
    /// `abstain_below` or is its reject label.
    pub label: Option<String>,
    /// For extract tasks, the recognised intent's slots (empty when nothing
    /// was recognised); `None` for classify tasks.
    pub slots: Option<Vec<Slot>>,
    /// Time on the inference thread, including waiting for the batch.
    pub inference_ms: f64,
    /// Tokens this request put through the model: its own input tokens
    /// (cached prompt prefixes excluded), label tokens scored and reply
    /// tokens generated.
    pub tokens: usize,
    /// The stage that answered.
    pub by: Stage,
    /// Why nothing was recognised (`None` when something was).
    pub unrecognised: Option<Unrecognised>,
}

/// Why an input was not recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unrecognised {
    /// The best label's confidence is below the task's `abstain_below`.
    LowConfidence,
    /// The task's reject label (its out-of-scope examples) won.
    RejectLabel,
    /// The input is less like the task's examples than the least typical
    /// `novelty_quantile` of them are: out of scope ([`novelty`]).
    UnlikeExamples,
    /// A Hermes `intentFilter` allows none of the task's labels.
    Filtered,
    /// The templates matched nothing, and the task has no model stage.
    NoTemplateMatch,
    /// An upstream found that none of the labels fits (set by the
    /// daemon's escalation).
    Upstream,
    /// No valid answer came from the upstream, and the task's fallback is
    /// "not recognised" (set by the daemon's escalation).
    UpstreamUnavailable,
}

/// One message for the engine: its text and what its sender knows
/// around it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub text: String,
    /// Only these labels may be chosen (Hermes' `intentFilter`); `None`
    /// allows all.
    pub among: Option<Vec<String>>,
    /// Slot values the speaker's situation gives, such as the area a voice
    /// satellite is in; they fill slots the message leaves empty
    /// ([`context::fill`]).
    pub context: BTreeMap<String, String>,
}

impl From<String> for Query {
    fn from(text: String) -> Query {
        Query {
            text,
            ..Query::default()
        }
    }
}

/// Told on the inference thread, before anything is decoded, the tags of
/// the requests a batch takes (once per batch, so one durable write can
/// cover them all); it may block.
pub type Admit = Arc<dyn Fn(&[u64]) + Send + Sync>;

struct Job {
    task: usize,
    query: Query,
    /// The caller's tag for the request, and whom to tell when it is taken.
    admit: Option<(u64, Admit)>,
    reply: oneshot::Sender<Result<Scores, EngineError>>,
}

/// What the inference thread is asked to do.
enum Command {
    Infer(Job),
    /// Decode task `task`'s intent prompts now.
    Warm {
        task: usize,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Answered as soon as the thread gets to it: proof of progress.
    Ping(oneshot::Sender<()>),
}

/// A cheap, cloneable handle to the inference thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    tasks: std::sync::Arc<Vec<String>>,
    /// Per task, its template stage.
    stages: std::sync::Arc<Vec<Option<TemplateStage>>>,
    pub model: ModelInfo,
}

fn backend() -> Result<&'static LlamaBackend, EngineError> {
    // llama.cpp's backend may be initialised once per process; keep it for
    // the process lifetime (across model swaps).
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| EngineError::Backend(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| b))
}

impl Engine {
    /// Starts the inference thread and waits until the model is loaded and
    /// every task's head is trained. Blocking: call it before the runtime's
    /// hot path, or from `spawn_blocking`.
    pub fn start(opts: EngineOptions, tasks: Vec<TaskSpec>) -> Result<Engine, EngineError> {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let names = tasks.iter().map(|t| t.name.clone()).collect();
        let stages = tasks.iter().map(|t| t.templates.clone()).collect();
        let model = opts.model.clone();
        std::thread::Builder::new()
            .name("slmd-inference".into())
            .spawn(move || inference_thread(opts, tasks, rx, ready_tx))
            .map_err(|e| EngineError::Backend(e.to_string()))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Engine {
            tx,
            stages: std::sync::Arc::new(stages),
            tasks: std::sync::Arc::new(names),
            model,
        })
    }

    /// No model: every message gets its task's first label with confidence
    /// 1, at once. For measuring the message path alone (`slmd run
    /// --no-inference`); never a substitute for the engine in a result.
    pub fn trivial(tasks: &[(String, Vec<String>)]) -> Engine {
        let firsts: Vec<String> = tasks
            .iter()
            .map(|(_, labels)| labels.first().cloned().unwrap_or_default())
            .collect();
        let names = tasks.iter().map(|(n, _)| n.clone()).collect();
        let model = ModelInfo {
            version: None,
            name: "none (--no-inference)".into(),
            sha256: "0".repeat(64),
        };
        Engine::from_fn(names, model, move |task, _| {
            let label = firsts[task].clone();
            Ok(Scores {
                ranked: vec![(label.clone(), 1.0)],
                label: Some(label),
                slots: None,
                inference_ms: 0.0,
                tokens: 0,
                by: Stage::Model,
                unrecognised: None,
            })
        })
    }

    /// An engine without a model that answers task `tasks[i]`'s queries
    /// with `answer(i, query)`: the stand-in that lets the code around the
    /// engine (routing, dedup, commits) be tested without llama.cpp. Runs
    /// on the current tokio runtime.
    pub fn from_fn(
        tasks: Vec<String>,
        model: ModelInfo,
        answer: impl Fn(usize, &Query) -> Result<Scores, EngineError> + Send + 'static,
    ) -> Engine {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Infer(job) => {
                        if let Some((tag, admit)) = job.admit {
                            let _ = tokio::task::spawn_blocking(move || admit(&[tag])).await;
                        }
                        let _ = job.reply.send(answer(job.task, &job.query));
                    }
                    Command::Warm { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                    Command::Ping(reply) => {
                        let _ = reply.send(());
                    }
                }
            }
        });
        Engine {
            tx,
            stages: std::sync::Arc::new(vec![None; tasks.len()]),
            tasks: std::sync::Arc::new(tasks),
            model,
        }
    }

    fn task_index(&self, task: &str) -> Result<usize, EngineError> {
        self.tasks
            .iter()
            .position(|t| t == task)
            .ok_or_else(|| EngineError::UnknownTask(task.to_owned()))
    }

    /// The task's template stage's answer, if it has one (bounded work on
    /// the caller's thread: well under a millisecond for Home Assistant's
    /// English templates).
    fn by_template(&self, task: &str, query: &Query) -> Result<Option<Scores>, EngineError> {
        let i = self.task_index(task)?;
        Ok(self.stages[i].as_ref().and_then(|s| s.answer(query)))
    }

    fn job(
        &self,
        task: &str,
        query: Query,
        admit: Option<(u64, Admit)>,
    ) -> Result<(Command, oneshot::Receiver<Result<Scores, EngineError>>), EngineError> {
        let task = self.task_index(task)?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            task,
            query,
            admit,
            reply,
        };
        Ok((Command::Infer(job), rx))
    }

    /// Decodes an extract task's intent prompts ahead of its messages (the
    /// engine does this at start-up when every task's prompts fit; `eval`
    /// does it per fold, so latency is measured as the daemon sees it).
    pub fn warm_blocking(&self, task: &str) -> Result<(), EngineError> {
        let task = self.task_index(task)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::Warm { task, reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }

    /// Returns once the inference thread has taken a command off its queue
    /// and answered it (the watchdog's proof that it is not stuck).
    pub async fn ping(&self) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ping(reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Task `task`'s answer to `query`. When the query restricts the
    /// labels (`among`: a dialogue that expects one of a few intents), the
    /// probabilities are renormalised over them, and the task's reject label
    /// always stays in; names that are not labels of the task are ignored.
    pub async fn infer(&self, task: &str, query: impl Into<Query>) -> Result<Scores, EngineError> {
        self.infer_admitted(task, query, None).await
    }

    /// [`Engine::infer`], telling `admit` the request's `tag` when the
    /// inference thread takes it into a batch: what waits in the queue has
    /// not reached the model, and a process that dies then did not die of it.
    pub async fn infer_admitted(
        &self,
        task: &str,
        query: impl Into<Query>,
        admit: Option<(u64, Admit)>,
    ) -> Result<Scores, EngineError> {
        let query = query.into();
        if let Some(scores) = self.by_template(task, &query)? {
            return Ok(scores);
        }
        let (job, rx) = self.job(task, query, admit)?;
        self.tx.send(job).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// For callers outside the async runtime (the CLI, eval).
    pub fn infer_blocking(
        &self,
        task: &str,
        query: impl Into<Query>,
    ) -> Result<Scores, EngineError> {
        let query = query.into();
        if let Some(scores) = self.by_template(task, &query)? {
            return Ok(scores);
        }
        let (job, rx) = self.job(task, query, None)?;
        self.tx
            .blocking_send(job)
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }
}

/// Test hooks (compiled in by the test build only, see `slmd_core::fault`):
/// a message whose text is `SLMD_FAULT_STALL_ON` stalls the inference
/// thread, as a wedged backend would; one whose text is
/// `SLMD_FAULT_CRASH_ON` kills the process, as a message that crashes
/// llama.cpp would.
fn stall_if_asked(text: &str) {
    slmd_core::fault::stall_if("SLMD_FAULT_STALL_ON", text);
    slmd_core::fault::kill_if("SLMD_FAULT_CRASH_ON", text);
}

/// Tells each batch's [`Admit`] the tags of its requests, once.
fn admit(commands: &[Command]) {
    let mut told: Vec<&Admit> = Vec::new();
    for command in commands {
        let Command::Infer(Job {
            admit: Some((_, to)),
            ..
        }) = command
        else {
            continue;
        };
        if told.iter().any(|t| Arc::ptr_eq(t, to)) {
            continue;
        }
        let tags: Vec<u64> = commands
            .iter()
            .filter_map(|c| match c {
                Command::Infer(Job {
                    admit: Some((tag, t)),
                    ..
                }) if Arc::ptr_eq(t, to) => Some(*tag),
                _ => None,
            })
            .collect();
        to(&tags);
        told.push(to);
    }
}

/// Everything the inference thread owns once set up.
struct Worker<'m> {
    embedder: Embedder<'m>,
    /// Only when some task uses label scoring.
    scorer: Option<scorer::Scorer<'m>>,
    tasks: Vec<TaskSpec>,
    /// `None` for label-scoring tasks.
    heads: Vec<Option<Head>>,
    /// Only when some task extracts.
    generator: Option<Generator<'m>>,
    /// Per task, per label: the intent's slot prompt.
    prompts: Vec<Vec<Option<IntentPrompt>>>,
}

fn inference_thread(
    opts: EngineOptions,
    tasks: Vec<TaskSpec>,
    mut rx: mpsc::Receiver<Command>,
    ready: std::sync::mpsc::SyncSender<Result<(), EngineError>>,
) {
    if let Err(e) = opts.tuning.apply_to_this_thread() {
        let _ = ready.send(Err(e));
        return;
    }
    // The header is read once: the cut and the Q4_0 copy both depend on it.
    let header = match crate::models::gguf::describe(&opts.model_path) {
        Ok(h) => h,
        Err(e) => {
            let _ = ready.send(Err(load_err(&opts.model_path, e)));
            return;
        }
    };
    let head_model = match head_model(&opts, &header, &tasks) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // The whole model is loaded only when something reads it: heads that
    // read every block, label scoring or generation. A classify-only
    // configuration with cut heads keeps one model in memory, not two.
    let whole_needed = head_model.is_none()
        || tasks
            .iter()
            .any(|t| t.strategy == Strategy::LabelScoring || t.extract.is_some());
    let model = match whole_needed.then(|| load_model(&opts, &header)).transpose() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut worker = match Worker::new(&opts, model.as_ref(), head_model.as_ref(), tasks) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    while let Some(first) = rx.blocking_recv() {
        let started = Instant::now();
        let mut commands = vec![first];
        while commands.len() < opts.decode.max_batch.max(1) {
            match rx.try_recv() {
                Ok(command) => commands.push(command),
                Err(_) => break,
            }
        }
        let tokens = worker.run_batch(commands, started);
        THROUGHPUT.record(tokens, started.elapsed());
    }
    log::debug!("inference thread stopping: every engine handle is gone");
}

/// The whole model: the fetched file, or with `generate_requantize` and
/// Q4_1 blocks, a Q4_0 copy derived once into the head cache
/// ([`crate::models::requant`]), read rather than mapped.
/// Returns it with its identity (the fetched file's SHA-256, marked when
/// it is the Q4_0 copy).
fn load_model(
    opts: &EngineOptions,
    header: &Description,
) -> Result<(Arc<LlamaModel>, String), EngineError> {
    let Some(path) = whole_q4_0(opts, header)? else {
        let model = load_model_file(&opts.model_path, &opts.model.name, &opts.tuning, true)?;
        return Ok((model, opts.model.sha256.clone()));
    };
    let name = format!("{} (as Q4_0)", opts.model.name);
    let model = load_model_file(&path, &name, &opts.tuning, false)?;
    Ok((model, format!("{}{WHOLE_Q4_0}", opts.model.sha256)))
}

/// The Q4_0 copy of the whole model, derived if missing; `None` when it is
/// not wanted or the model's blocks are not all Q4_1.
fn whole_q4_0(opts: &EngineOptions, header: &Description) -> Result<Option<PathBuf>, EngineError> {
    if !opts.generate_requantize || !requant::has_q4_1_blocks(&header.tensors) {
        return Ok(None);
    }
    let dir = opts.head_cache.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("{}{WHOLE_Q4_0}", opts.model.sha256));
    if !path.is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| load_err(&dir, e))?;
        let started = Instant::now();
        backend()?; // so that llama.cpp's quantiser logs through ours
        requant::to_q4_0(&opts.model_path, &path, threads(opts.threads))
            .map_err(|e| load_err(&path, e))?;
        log::info!(
            "generation reads the model as Q4_0 ({} ms to derive): {}",
            started.elapsed().as_millis(),
            path.display()
        );
        if opts.head_cache.is_some() {
            remove_other_derived(&dir, &path, WHOLE_Q4_0);
        }
    }
    Ok(Some(path))
}

/// The name ending of a whole model's Q4_0 copy in the head cache.
const WHOLE_Q4_0: &str = "-q4_0-whole.gguf";

/// Loads a model, mapping its file when `mmap`. A file whose weights
/// llama.cpp repacks is better read: mapped, its pages stay resident beside
/// the repacked copy (40 MB more peak RSS for the Q4_0 cut).
///
/// A model another engine of this process still holds is shared, not
/// loaded again: an entity injection or a reload starts a new engine while
/// the old one serves, and their weights are the same (a model's file name
/// is its content's: its SHA-256 and how it was derived from it).
fn load_model_file(
    path: &Path,
    name: &str,
    tuning: &Tuning,
    mmap: bool,
) -> Result<Arc<LlamaModel>, EngineError> {
    type Loaded = HashMap<(PathBuf, bool, bool), std::sync::Weak<LlamaModel>>;
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let key = (path.to_path_buf(), mmap, tuning.mlock);
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    loaded.retain(|_, model| model.strong_count() > 0);
    if let Some(model) = loaded.get(&key).and_then(std::sync::Weak::upgrade) {
        log::info!("model {name} shared with the serving engine");
        return Ok(model);
    }
    let backend = backend()?;
    let started = Instant::now();
    let params = LlamaModelParams::default()
        .with_use_mmap(mmap)
        .with_use_mlock(tuning.mlock);
    let model =
        LlamaModel::load_from_file(backend, path, &params).map_err(|e| load_err(path, e))?;
    log::info!(
        "model {name} loaded from {} in {} ms",
        path.display(),
        started.elapsed().as_millis()
    );
    let model = Arc::new(model);
    loaded.insert(key, Arc::downgrade(&model));
    Ok(model)
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Models in the head cache derived like `keep` (their names hold
/// `kind`: a cut of another model, depth or quantisation, or another
/// model's Q4_0 copy) other than `keep`, and the parts of one whose writing
/// a crash interrupted, are removed; an engine still reading one has it in
/// memory, and a rollback derives its file again.
fn remove_other_derived(dir: &Path, keep: &Path, kind: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let derived = path.to_str().is_some_and(|p| p.contains(kind));
        if derived && path != keep {
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// The model heads read when they read fewer than all blocks (see
/// [`EngineOptions::head_depth`]), and its identity for the head cache;
/// `None` when no task has a head or the depth keeps every block.
fn head_model(
    opts: &EngineOptions,
    header: &Description,
    tasks: &[TaskSpec],
) -> Result<Option<(Arc<LlamaModel>, String)>, EngineError> {
    if !tasks.iter().any(|t| t.strategy == Strategy::Head) {
        return Ok(None);
    }
    let all = header.block_count;
    let blocks = ((opts.head_depth * all as f32).round() as u32).clamp(1, all);
    if blocks == all {
        return Ok(None);
    }
    let q4_0 = opts.head_requantize && requant::has_q4_1_blocks(&header.tensors);
    // "untied": the Q4_0 cut has an output matrix of its own (requant.rs).
    let kind = if q4_0 { "-q4_0-untied" } else { "" };
    let id = format!("{}{kind}-{blocks}of{all}blocks", opts.model.sha256);
    let dir = opts.head_cache.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("{id}.gguf"));
    if !path.is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| load_err(&dir, e))?;
        derive_cut(opts, &path, blocks, q4_0)?;
        log::info!(
            "heads read the first {blocks} of {all} blocks{}: {}",
            if q4_0 { " as Q4_0" } else { "" },
            path.display()
        );
        if opts.head_cache.is_some() {
            remove_other_derived(&dir, &path, "blocks.gguf");
        }
    }
    let name = format!("{} ({blocks} of {all} blocks)", opts.model.name);
    Ok(Some((
        load_model_file(&path, &name, &opts.tuning, !q4_0)?,
        id,
    )))
}

/// Writes to `path` the model cut to its first `blocks` blocks, then, when
/// `q4_0`, requantised from Q4_1 with an output matrix of its own (the cut
/// is written beside it first).
fn derive_cut(
    opts: &EngineOptions,
    path: &Path,
    blocks: u32,
    q4_0: bool,
) -> Result<(), EngineError> {
    let cut = if q4_0 {
        path.with_extension("gguf.q4_1")
    } else {
        path.to_path_buf()
    };
    crate::models::gguf::keep_blocks(&opts.model_path, &cut, blocks, q4_0)
        .map_err(|e| load_err(&cut, e))?;
    if q4_0 {
        backend()?; // so that llama.cpp's quantiser logs through ours
        let written = requant::to_q4_0(&cut, path, threads(opts.threads));
        let _ = std::fs::remove_file(&cut);
        written.map_err(|e| load_err(path, e))?;
    }
    Ok(())
}

/// Context cells for `cached` prompt tokens that stay decoded plus `room`
/// cells for requests.
fn beside(cached: usize, room: u32) -> u32 {
    u32::try_from(cached)
        .unwrap_or(u32::MAX)
        .saturating_add(room)
}

/// A context whose whole window can be decoded in one batch, with a unified
/// KV cache so that copying a sequence shares its cells.
fn context_params(n_ctx: u32, sequences: usize, threads: i32) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_ubatch(n_ctx)
        .with_n_seq_max(sequences as u32)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
}

fn threads(configured: u32) -> i32 {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
        n => n as i32,
    }
}

impl<'m> Worker<'m> {
    /// `model` is the whole model, `None` when nothing but cut heads read
    /// it (see [`inference_thread`]).
    fn new(
        opts: &EngineOptions,
        model: Option<&'m (Arc<LlamaModel>, String)>,
        head_model: Option<&'m (Arc<LlamaModel>, String)>,
        tasks: Vec<TaskSpec>,
    ) -> Result<Self, EngineError> {
        let whole = || {
            model
                .map(|(m, _)| m)
                .ok_or_else(|| load_err(&opts.model_path, "the whole model was not loaded"))
        };
        let templates: Vec<Template> = tasks
            .iter()
            .map(|t| Template::new(opts.format, &t.instruction, &t.cue))
            .collect();
        let (embedding_model, model_id) = match head_model.or(model) {
            Some((m, id)) => (m, id.as_str()),
            None => (whole()?, opts.model.sha256.as_str()),
        };
        let mut embedder = Embedder::new(
            backend()?,
            embedding_model,
            &templates,
            opts.context_size,
            threads(opts.threads),
            opts.decode,
        )?;
        // Tasks that share a template and examples (eval's folds) embed
        // each example once.
        let mut memo = HashMap::new();
        let mut heads = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            heads.push(match task.strategy {
                Strategy::Head => Some(cached_or_train(
                    &mut embedder,
                    i,
                    task,
                    model_id,
                    opts,
                    &mut memo,
                )?),
                Strategy::LabelScoring => None,
            });
        }
        let scored: Vec<bool> = heads.iter().map(Option::is_none).collect();
        let scorer = if scored.contains(&true) {
            Some(scorer::Scorer::new(
                backend()?,
                whole()?,
                opts.format,
                &tasks,
                &scored,
                opts.context_size,
                threads(opts.threads),
            )?)
        } else {
            None
        };
        let prompts: Vec<Vec<Option<IntentPrompt>>> = tasks
            .iter()
            .map(|t| match &t.extract {
                Some(x) => x.prompts(opts.format, t),
                None => Vec::new(),
            })
            .collect();
        let generator = if tasks.iter().any(|t| t.extract.is_some()) {
            let generated = generated(&prompts);
            let id = model.map_or(opts.model.sha256.as_str(), |(_, id)| id.as_str());
            Some(Generator::new(backend()?, whole()?, id, opts, &generated)?)
        } else {
            None
        };
        let mut worker = Worker {
            embedder,
            scorer,
            tasks,
            heads,
            generator,
            prompts,
        };
        // Every intent prompt restored or decoded now, so that no request
        // waits for one: all at once when they fit in the context; else
        // one by one, each saved to disk, so that a request restores the
        // one it needs in milliseconds (eval, which saves none, warms each
        // fold before testing it).
        let Some(g) = &worker.generator else {
            return Ok(worker);
        };
        let together = g.fits(&worker.intent_prompts());
        if together || g.saves() {
            for t in 0..worker.tasks.len() {
                let brought = worker.warm(t, together)?;
                if brought != extract::Brought::default() {
                    log::info!("task {}: {brought}", worker.tasks[t].name);
                }
            }
            let g = worker.generator.as_ref().expect("a generator");
            g.prune_files(&worker.intent_prompts());
        }
        Ok(worker)
    }

    /// The intent prompts whose replies are generated, of every task.
    fn intent_prompts(&self) -> Vec<&IntentPrompt> {
        generated(&self.prompts)
    }

    /// Restores or decodes task `task`'s intent prompts into the
    /// generator's cache: `together` in one go, else one by one (each may
    /// evict the last).
    fn warm(&mut self, task: usize, together: bool) -> Result<extract::Brought, EngineError> {
        let Some(generator) = self.generator.as_mut() else {
            return Ok(extract::Brought::default());
        };
        let prompts: Vec<(u64, &IntentPrompt)> = self.prompts[task]
            .iter()
            .enumerate()
            .filter_map(|(l, p)| Some((prompt_key(task, l), p.as_ref()?)))
            .filter(|(_, p)| p.generate)
            .collect();
        if together {
            return generator.warm(&prompts);
        }
        let mut all = extract::Brought::default();
        for one in prompts.chunks(1) {
            all += generator.warm(one)?;
        }
        Ok(all)
    }

    /// Answers a batch of commands; returns the tokens put through the model.
    fn run_batch(&mut self, commands: Vec<Command>, started: Instant) -> usize {
        admit(&commands);
        let mut jobs = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Infer(job) => {
                    stall_if_asked(&job.query.text);
                    jobs.push(job)
                }
                Command::Warm { task, reply } => {
                    let _ = reply.send(self.warm(task, true).map(drop));
                }
                Command::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
        }
        let (head_jobs, scored_jobs): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| self.heads[j.task].is_some());
        let mut decided = Vec::with_capacity(head_jobs.len() + scored_jobs.len());
        for job in scored_jobs {
            let t0 = Instant::now();
            let scorer = self.scorer.as_mut().expect("a scorer for scored tasks");
            let result = scorer
                .score(job.task, &job.query.text)
                .map(|(logp, tokens)| {
                    let task = &self.tasks[job.task];
                    let probs =
                        restrict(task, head::softmax(&logp, 1.0), job.query.among.as_deref());
                    Scores {
                        tokens,
                        by: Stage::Model,
                        ..decide(task, probs, ms_since(t0))
                    }
                });
            decided.push((job, result));
        }
        if !head_jobs.is_empty() {
            decided.extend(self.run_heads(head_jobs, started));
        }
        self.fill_slots(&mut decided, started);
        let mut tokens = 0;
        for (job, result) in decided {
            tokens += result.as_ref().map_or(0, |s| s.tokens);
            let _ = job.reply.send(result);
        }
        tokens
    }

    fn run_heads(
        &mut self,
        jobs: Vec<Job>,
        started: Instant,
    ) -> Vec<(Job, Result<Scores, EngineError>)> {
        // Inputs too long for the context fail alone; the rest still run.
        let mut out = Vec::with_capacity(jobs.len());
        let mut ok = Vec::with_capacity(jobs.len());
        let mut requests = Vec::with_capacity(jobs.len());
        for job in jobs {
            let tokens = self.embedder.request_tokens(job.task, &job.query.text);
            if tokens.len() > self.embedder.max_tokens() {
                let limit = self.embedder.max_tokens();
                out.push((
                    job,
                    Err(EngineError::TooLong {
                        tokens: tokens.len(),
                        limit,
                    }),
                ));
            } else {
                let n = tokens.len();
                requests.push((job.task, tokens));
                ok.push((job, n));
            }
        }
        match self.embedder.embed(&requests) {
            Ok(xs) => {
                let inference_ms = ms_since(started);
                for ((job, tokens), x) in ok.into_iter().zip(xs) {
                    let task = &self.tasks[job.task];
                    let head = self.heads[job.task].as_ref().expect("a head");
                    let pooled = embed::pool(&x, &head.token_centre);
                    let text = &job.query.text;
                    let words = lexical::features(text);
                    let novel = head.novelty.as_ref().is_some_and(|n| {
                        let bar = n.threshold(task.novelty_quantile);
                        bar > f32::NEG_INFINITY && n.score(&pooled, &words) < bar
                    });
                    let probs = head.predict(&features(task, pooled, &words, text));
                    let probs = restrict(task, probs, job.query.among.as_deref());
                    let mut scores = Scores {
                        tokens,
                        by: Stage::Model,
                        ..decide(task, probs, inference_ms)
                    };
                    if novel && scores.label.is_some() {
                        scores.label = None;
                        scores.unrecognised = Some(Unrecognised::UnlikeExamples);
                    }
                    out.push((job, Ok(scores)));
                }
            }
            Err(e) => out.extend(ok.into_iter().map(|(job, _)| (job, Err(e.clone())))),
        }
        out
    }

    /// Generates the slots of every recognised intent of an extract task,
    /// all in one batch; a reply that fails fails only its own request.
    fn fill_slots(&mut self, decided: &mut [(Job, Result<Scores, EngineError>)], started: Instant) {
        let Worker {
            generator: Some(generator),
            prompts,
            tasks,
            ..
        } = self
        else {
            return;
        };
        let mut wanted = Vec::new();
        for (i, (job, result)) in decided.iter_mut().enumerate() {
            let Ok(scores) = result else { continue };
            if tasks[job.task].extract.is_none() {
                continue;
            }
            scores.slots = Some(Vec::new());
            let Some(label) = &scores.label else { continue };
            let l = tasks[job.task]
                .labels
                .iter()
                .position(|x| x == label)
                .expect("a task label");
            match &prompts[job.task][l] {
                Some(prompt) if prompt.generate => {
                    wanted.push((i, prompt_key(job.task, l), prompt));
                }
                Some(prompt) => {
                    let mut slots = Vec::new();
                    settle(prompt, &mut slots, &job.query);
                    scores.slots = Some(slots);
                }
                None => {}
            }
        }
        if wanted.is_empty() {
            return;
        }
        let requests: Vec<extract::Request<'_>> = wanted
            .iter()
            .map(|&(i, key, prompt)| extract::Request {
                key,
                prompt,
                text: &decided[i].0.query.text,
            })
            .collect();
        let replies = generator.generate(&requests);
        drop(requests);
        for ((i, _, prompt), reply) in wanted.into_iter().zip(replies) {
            let (job, result) = &mut decided[i];
            // Only answered requests generate.
            let Ok(scores) = result else { continue };
            let slots = reply.and_then(|g| {
                let mut slots = schema::parse_output(&prompt.slots, &g.text, &job.query.text)
                    .map_err(|e| {
                        EngineError::Decode(format!("generated slots {:?}: {e}", g.text))
                    })?;
                settle(prompt, &mut slots, &job.query);
                Ok((slots, g.tokens))
            });
            match slots {
                Ok((slots, tokens)) => {
                    scores.slots = Some(slots);
                    scores.tokens += tokens;
                    scores.inference_ms = ms_since(started);
                }
                Err(e) => *result = Err(e),
            }
        }
    }
}

/// Brings an intent's slots (generated, or none when the intent is read
/// without the model) in line with the query's text and context.
fn settle(prompt: &IntentPrompt, slots: &mut Vec<Slot>, query: &Query) {
    prompt.grounding.ground(&prompt.slots, slots, &query.text);
    context::fill(&prompt.slots, slots, &query.context);
}

/// The prompts of `prompts` (per task, per label) whose replies are
/// generated.
fn generated(prompts: &[Vec<Option<IntentPrompt>>]) -> Vec<&IntentPrompt> {
    prompts
        .iter()
        .flatten()
        .flatten()
        .filter(|p| p.generate)
        .collect()
}

/// The generator's cache key of task `task`'s label `label`.
fn prompt_key(task: usize, label: usize) -> u64 {
    ((task as u64) << 32) | label as u64
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The head's input: the hidden state, then the text's n-gram features
/// (`words`, [`lexical::features`] of `text`) and its command concepts,
/// each scaled by the task's weight for them.
fn features(task: &TaskSpec, mut hidden: Vec<f32>, words: &[f32], text: &str) -> Vec<f32> {
    if task.lexical_weight > 0.0 {
        hidden.extend(words.iter().map(|v| v * task.lexical_weight));
    }
    if task.concept_weight > 0.0 {
        hidden.extend(
            task.concepts
                .features(text)
                .into_iter()
                .map(|v| v * task.concept_weight),
        );
    }
    hidden
}

/// The probabilities given that the label is one of `among` (and the
/// reject label): the others become 0 and the rest are renormalised. When
/// none of `among` is a label, every probability is 0 and nothing is
/// recognised.
fn restrict(task: &TaskSpec, mut probs: Vec<f32>, among: Option<&[String]>) -> Vec<f32> {
    let Some(among) = among else { return probs };
    for (p, label) in probs.iter_mut().zip(&task.labels) {
        let kept = among.contains(label) || task.reject_label.as_ref() == Some(label);
        if !kept {
            *p = 0.0;
        }
    }
    let sum: f32 = probs.iter().sum();
    if sum > 0.0 {
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    probs
}

/// Ranks the labels and applies the task's abstention rules.
pub fn decide(task: &TaskSpec, probs: Vec<f32>, inference_ms: f64) -> Scores {
    let mut ranked: Vec<(String, f32)> = task.labels.iter().cloned().zip(probs).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (best, p) = &ranked[0];
    let unrecognised = if *p <= 0.0 {
        Some(Unrecognised::Filtered)
    } else if task.reject_label.as_deref() == Some(best.as_str()) {
        Some(Unrecognised::RejectLabel)
    } else if *p < task.abstain_below {
        Some(Unrecognised::LowConfidence)
    } else {
        None
    };
    let label = unrecognised.is_none().then(|| best.clone());
    Scores {
        ranked,
        label,
        slots: None,
        inference_ms,
        tokens: 0,
        by: Stage::Model,
        unrecognised,
    }
}

/// What a trained head depends on: the model it reads (its sha256, and how
/// many blocks when cut), its prompt format, the task's prompt, labels and
/// examples (in order), its features and the training code.
pub fn head_key(model_id: &str, format: PromptFormat, task: &TaskSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(b"head-v5");
    field(model_id.as_bytes());
    field(format!("{format:?}").as_bytes());
    field(task.instruction.as_bytes());
    field(task.cue.as_bytes());
    field(&task.lexical_weight.to_le_bytes());
    field(&task.concept_weight.to_le_bytes());
    for (name, words) in task.concepts.groups() {
        field(name.as_bytes());
        field(words.join(" ").as_bytes());
    }
    for l in &task.labels {
        field(l.as_bytes());
    }
    for e in &task.examples {
        field(e.text.as_bytes());
        field(e.label.as_bytes());
    }
    hex::encode(h.finalize())
}

fn cached_or_train(
    embedder: &mut Embedder<'_>,
    index: usize,
    task: &TaskSpec,
    model_id: &str,
    opts: &EngineOptions,
    memo: &mut HashMap<(String, String, String), States>,
) -> Result<Head, EngineError> {
    // The head is trained on the inference thread's CPUs, all of them.
    let workers = threads(opts.threads) as usize;
    let Some(dir) = &opts.head_cache else {
        return train(embedder, index, task, memo, &opts.progress, workers);
    };
    let path = dir.join(format!("{}.json", head_key(model_id, opts.format, task)));
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<Head>(&bytes) {
            Ok(head) if head.labels == task.labels => {
                log::info!("task {}: head loaded from {}", task.name, path.display());
                return Ok(head);
            }
            _ => log::warn!("ignoring unreadable cached head {}", path.display()),
        }
    }
    let head = train(embedder, index, task, memo, &opts.progress, workers)?;
    // A cache that cannot be written costs only time at the next start.
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        slmd_core::fsutil::write_atomic(&path, &serde_json::to_vec(&head)?)
    };
    if let Err(e) = write() {
        log::warn!(
            "cannot cache the head of task {} at {}: {e}",
            task.name,
            path.display()
        );
    }
    Ok(head)
}

/// Folds of the training examples used to calibrate the head's confidence.
const CALIBRATION_FOLDS: usize = 5;

/// Examples embedded between progress reports.
const EMBED_STEP: usize = 16;

fn train(
    embedder: &mut Embedder<'_>,
    index: usize,
    task: &TaskSpec,
    memo: &mut HashMap<(String, String, String), States>,
    progress: &Progress,
    workers: usize,
) -> Result<Head, EngineError> {
    let started = Instant::now();
    let fail = |message: String| EngineError::Training {
        task: task.name.clone(),
        message,
    };
    let mut ys = Vec::with_capacity(task.examples.len());
    for ex in &task.examples {
        let y = task
            .labels
            .iter()
            .position(|l| *l == ex.label)
            .ok_or_else(|| fail(format!("example label {:?} is not a task label", ex.label)))?;
        ys.push(y);
    }
    let key = |text: &str| (task.instruction.clone(), task.cue.clone(), text.to_owned());
    let missing: Vec<&Example> = task
        .examples
        .iter()
        .filter(|e| !memo.contains_key(&key(&e.text)))
        .collect();
    let requests: Vec<_> = missing
        .iter()
        .map(|e| (index, embedder.request_tokens(index, &e.text)))
        .collect();
    let mut step = progress.step(
        format!("task {}: examples embedded", task.name),
        requests.len(),
    );
    for (es, rs) in missing.chunks(EMBED_STEP).zip(requests.chunks(EMBED_STEP)) {
        for (e, x) in es.iter().zip(embedder.embed(rs)?) {
            memo.insert(key(&e.text), x);
        }
        step.advance(rs.len());
    }
    let embedded_ms = started.elapsed().as_millis();
    let centre = embed::centre_of(task.examples.iter().map(|e| &memo[&key(&e.text)]));
    let pooled: Vec<Vec<f32>> = task
        .examples
        .iter()
        .map(|e| embed::pool(&memo[&key(&e.text)], &centre))
        .collect();
    let lexical: Vec<Vec<f32>> = task
        .examples
        .iter()
        .map(|e| lexical::features(&e.text))
        .collect();
    let xs: Vec<Vec<f32>> = task
        .examples
        .iter()
        .zip(pooled.iter().zip(&lexical))
        .map(|(e, (p, w))| features(task, p.clone(), w, &e.text))
        .collect();
    let fits = Mutex::new(progress.step(
        format!("task {}: head fits", task.name),
        CALIBRATION_FOLDS + 1,
    ));
    let mut head = Head::train_calibrated(
        task.labels.clone(),
        &xs,
        &ys,
        TrainOptions::default(),
        CALIBRATION_FOLDS,
        workers,
        || fits.lock().unwrap_or_else(|e| e.into_inner()).advance(1),
    );
    head.token_centre = centre;
    // What is typical of the task is what it accepts: its reject label's
    // examples (out of scope) would make out-of-scope input look typical.
    let accepted: Vec<usize> = (0..ys.len())
        .filter(|&i| task.reject_label.as_ref() != Some(&task.labels[ys[i]]))
        .collect();
    let hidden: Vec<&[f32]> = accepted.iter().map(|&i| pooled[i].as_slice()).collect();
    let words: Vec<&[f32]> = accepted.iter().map(|&i| lexical[i].as_slice()).collect();
    let accepted_ys: Vec<usize> = accepted.iter().map(|&i| ys[i]).collect();
    head.novelty = novelty::Novelty::fit(&hidden, &words, &accepted_ys);
    if head.novelty.is_none() {
        log::info!(
            "task {}: no novelty score (fewer than {} examples to accept)",
            task.name,
            novelty::MIN_EXAMPLES
        );
    }
    log::info!(
        "task {}: head trained on {} examples ({} embedded in {} ms), {} labels, temperature {:.2}, in {} ms",
        task.name,
        xs.len(),
        requests.len(),
        embedded_ms,
        task.labels.len(),
        head.temperature,
        started.elapsed().as_millis()
    );
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_tells_each_admit_its_own_tags_once() {
        type Told = Vec<(char, Vec<u64>)>;
        let calls: Arc<Mutex<Told>> = Arc::default();
        let to = |name: char| -> Admit {
            let calls = calls.clone();
            Arc::new(move |tags: &[u64]| calls.lock().unwrap().push((name, tags.to_vec())))
        };
        let (a, b) = (to('a'), to('b'));
        let job = |admit: Option<(u64, Admit)>| {
            let (reply, _) = oneshot::channel();
            Command::Infer(Job {
                task: 0,
                query: Query::default(),
                admit,
                reply,
            })
        };
        let (ping, _) = oneshot::channel();
        let batch = [
            job(Some((7, a.clone()))),
            Command::Ping(ping),
            job(None),
            job(Some((3, b.clone()))),
            job(Some((9, a))),
        ];
        admit(&batch);
        assert_eq!(*calls.lock().unwrap(), [('a', vec![7, 9]), ('b', vec![3])]);
    }

    #[test]
    fn tuning_pins_and_renices_only_the_inference_thread() {
        let tuning = Tuning {
            mlock: false,
            nice: Some(5),
            cpus: vec![0],
        };
        let (affinity, nice) = std::thread::spawn(move || {
            tuning.apply_to_this_thread().unwrap();
            let tid = nix::unistd::gettid();
            let set = nix::sched::sched_getaffinity(tid).unwrap();
            // SAFETY: a plain syscall with integer arguments.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t) };
            (set, nice)
        })
        .join()
        .unwrap();
        assert!(affinity.is_set(0).unwrap());
        assert!(!affinity.is_set(1).unwrap_or(false));
        assert_eq!(nice, 5);
        // The calling thread is untouched.
        // SAFETY: as above.
        let here = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_ne!(here, 5);
    }

    fn task() -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            strategy: Strategy::Head,
            instruction: "Classify the command.".into(),
            cue: "The intent is:".into(),
            lexical_weight: 1.0,
            concept_weight: 2.0,
            concepts: Default::default(),
            abstain_below: 0.5,
            reject_label: Some("oos".into()),
            novelty_quantile: 0.0,
            extract: None,
            templates: None,
            labels: vec!["on".into(), "off".into()],
            examples: vec![
                Example {
                    text: "lights on".into(),
                    label: "on".into(),
                    slots: None,
                },
                Example {
                    text: "lights off".into(),
                    label: "off".into(),
                    slots: None,
                },
            ],
        }
    }

    #[test]
    fn head_key_changes_with_everything_the_head_depends_on() {
        let base = head_key("sha", PromptFormat::Chatml, &task());
        assert_eq!(base, head_key("sha", PromptFormat::Chatml, &task()));
        assert_ne!(base, head_key("other", PromptFormat::Chatml, &task()));
        assert_ne!(base, head_key("sha", PromptFormat::Gemma, &task()));
        let mut t = task();
        t.examples[0].text = "lamp on".into();
        assert_ne!(
            base,
            head_key("sha", PromptFormat::Chatml, &t),
            "a changed example retrains"
        );
        let mut t = task();
        t.examples.push(Example {
            text: "on please".into(),
            label: "on".into(),
            slots: None,
        });
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.instruction.push('!');
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.cue.push('!');
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.lexical_weight = 0.5;
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.concept_weight = 0.0;
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        let table = [("on".to_string(), vec!["on".to_string()])].into();
        t.concepts = concepts::Concepts::from(&table);
        assert_ne!(
            base,
            head_key("sha", PromptFormat::Chatml, &t),
            "other concept groups retrain"
        );
        let mut t = task();
        t.labels.swap(0, 1);
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
    }

    #[test]
    fn decide_abstains_below_threshold_and_on_the_reject_label() {
        let mut t = task();
        t.labels = vec!["on".into(), "off".into(), "oos".into()];
        let s = decide(&t, vec![0.7, 0.2, 0.1], 1.0);
        assert_eq!(s.label.as_deref(), Some("on"));
        assert_eq!(s.ranked[0].0, "on");
        assert_eq!(s.unrecognised, None);
        let s = decide(&t, vec![0.45, 0.35, 0.2], 1.0);
        assert_eq!(s.label, None, "below abstain_below");
        assert_eq!(s.unrecognised, Some(Unrecognised::LowConfidence));
        assert_eq!(s.ranked.len(), 3, "alternatives are still listed");
        let s = decide(&t, vec![0.1, 0.1, 0.8], 1.0);
        assert_eq!(s.label, None, "the reject label is not a recognition");
        assert_eq!(s.unrecognised, Some(Unrecognised::RejectLabel));
        let s = decide(&t, vec![0.0, 0.0, 0.0], 1.0);
        assert_eq!(s.unrecognised, Some(Unrecognised::Filtered));
    }

    #[test]
    fn a_label_filter_renormalises_over_the_allowed_labels_and_keeps_the_reject_label() {
        let mut t = task();
        t.labels = vec!["on".into(), "off".into(), "dim".into(), "oos".into()];
        t.abstain_below = 0.0;
        let among = ["off".to_string(), "dim".to_string()];
        let p = restrict(&t, vec![0.6, 0.2, 0.1, 0.1], Some(&among));
        assert_eq!(p[0], 0.0, "a label outside the filter is never chosen");
        assert!((p[1] - 0.5).abs() < 1e-6 && (p[2] - 0.25).abs() < 1e-6);
        assert!((p[3] - 0.25).abs() < 1e-6, "the reject label stays");
        assert_eq!(decide(&t, p, 1.0).label.as_deref(), Some("off"));
        assert_eq!(restrict(&t, vec![0.6, 0.2, 0.1, 0.1], None)[0], 0.6);
        t.reject_label = None;
        let unknown = ["heat".to_string()];
        let p = restrict(&t, vec![0.6, 0.2, 0.1, 0.1], Some(&unknown));
        assert!(p.iter().all(|&x| x == 0.0));
        let s = decide(&t, p, 1.0);
        assert_eq!(
            s.label, None,
            "no allowed label: not recognised, even with no threshold"
        );
    }
}
