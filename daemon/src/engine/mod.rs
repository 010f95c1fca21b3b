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

pub mod embed;
pub mod head;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::examples::Example;
use crate::models::PromptFormat;
use embed::Embedder;
use head::{Head, TrainOptions};

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
}

/// What the engine needs to know about a task.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub instruction: String,
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
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
}

/// A classification: every label with its probability, best first.
#[derive(Debug, Clone)]
pub struct Scores {
    pub ranked: Vec<(String, f32)>,
    /// Time on the inference thread, including waiting for the batch.
    pub inference_ms: f64,
}

struct Job {
    task: usize,
    text: String,
    reply: oneshot::Sender<Result<Scores, EngineError>>,
}

/// A cheap, cloneable handle to the inference thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    tasks: std::sync::Arc<Vec<String>>,
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
        let model = opts.model.clone();
        std::thread::Builder::new()
            .name("slmd-inference".into())
            .spawn(move || inference_thread(opts, tasks, rx, ready_tx))
            .map_err(|e| EngineError::Backend(e.to_string()))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Engine {
            tx,
            tasks: std::sync::Arc::new(names),
            model,
        })
    }

    fn job(
        &self,
        task: &str,
        text: String,
    ) -> Result<(Job, oneshot::Receiver<Result<Scores, EngineError>>), EngineError> {
        let task = self
            .tasks
            .iter()
            .position(|t| t == task)
            .ok_or_else(|| EngineError::UnknownTask(task.to_owned()))?;
        let (reply, rx) = oneshot::channel();
        Ok((Job { task, text, reply }, rx))
    }

    pub async fn classify(&self, task: &str, text: String) -> Result<Scores, EngineError> {
        let (job, rx) = self.job(task, text)?;
        self.tx.send(job).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// For callers outside the async runtime (the CLI, eval).
    pub fn classify_blocking(&self, task: &str, text: String) -> Result<Scores, EngineError> {
        let (job, rx) = self.job(task, text)?;
        self.tx
            .blocking_send(job)
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }
}

fn inference_thread(
    opts: EngineOptions,
    tasks: Vec<TaskSpec>,
    mut rx: mpsc::Receiver<Job>,
    ready: std::sync::mpsc::SyncSender<Result<(), EngineError>>,
) {
    let setup = || -> Result<_, EngineError> {
        let backend = backend()?;
        let started = Instant::now();
        let model =
            LlamaModel::load_from_file(backend, &opts.model_path, &LlamaModelParams::default())
                .map_err(|e| EngineError::Load {
                    path: opts.model_path.clone(),
                    message: e.to_string(),
                })?;
        log::info!(
            "model {} loaded from {} in {} ms",
            opts.model.name,
            opts.model_path.display(),
            started.elapsed().as_millis()
        );
        Ok((backend, model))
    };
    let (backend, model) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
        n => n as i32,
    };
    let mut embedder = match Embedder::new(backend, &model, opts.format, opts.context_size, threads)
    {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut heads = Vec::with_capacity(tasks.len());
    for task in &tasks {
        match cached_or_train(&mut embedder, task, &opts) {
            Ok(h) => heads.push(h),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    drop(ready);

    while let Some(first) = rx.blocking_recv() {
        let started = Instant::now();
        let mut jobs = vec![first];
        while jobs.len() < embed::MAX_SEQUENCES {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        run_batch(&mut embedder, &tasks, &heads, jobs, started);
    }
    log::debug!("inference thread stopping: every engine handle is gone");
}

/// What a trained head depends on: the model, its prompt format, the task's
/// instruction, labels and examples (in order), and the training code.
pub fn head_key(model_sha256: &str, format: PromptFormat, task: &TaskSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(b"head-v1");
    field(model_sha256.as_bytes());
    field(format!("{format:?}").as_bytes());
    field(task.instruction.as_bytes());
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
    task: &TaskSpec,
    opts: &EngineOptions,
) -> Result<Head, EngineError> {
    let Some(dir) = &opts.head_cache else {
        return train(embedder, task);
    };
    let path = dir.join(format!(
        "{}.json",
        head_key(&opts.model.sha256, opts.format, task)
    ));
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<Head>(&bytes) {
            Ok(head) if head.labels == task.labels => {
                log::info!("task {}: head loaded from {}", task.name, path.display());
                return Ok(head);
            }
            _ => log::warn!("ignoring unreadable cached head {}", path.display()),
        }
    }
    let head = train(embedder, task)?;
    // A cache that cannot be written costs only time at the next start.
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&head)?)?;
        std::fs::rename(&tmp, &path)
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

fn train(embedder: &mut Embedder<'_>, task: &TaskSpec) -> Result<Head, EngineError> {
    let started = Instant::now();
    let fail = |message: String| EngineError::Training {
        task: task.name.clone(),
        message,
    };
    let mut ys = Vec::with_capacity(task.examples.len());
    let mut prompts = Vec::with_capacity(task.examples.len());
    for ex in &task.examples {
        let y = task
            .labels
            .iter()
            .position(|l| *l == ex.label)
            .ok_or_else(|| fail(format!("example label {:?} is not a task label", ex.label)))?;
        ys.push(y);
        prompts.push(embedder.prompt_tokens(&ex.text, &task.instruction));
    }
    let xs = embedder.embed(&prompts)?;
    let head = Head::train(task.labels.clone(), &xs, &ys, TrainOptions::default());
    log::info!(
        "task {}: head trained on {} examples, {} labels, in {} ms",
        task.name,
        xs.len(),
        task.labels.len(),
        started.elapsed().as_millis()
    );
    Ok(head)
}

fn run_batch(
    embedder: &mut Embedder<'_>,
    tasks: &[TaskSpec],
    heads: &[Head],
    jobs: Vec<Job>,
    started: Instant,
) {
    // Inputs too long for the context fail alone; the rest still run.
    let mut ok = Vec::with_capacity(jobs.len());
    let mut prompts = Vec::with_capacity(jobs.len());
    for job in jobs {
        let tokens = embedder.prompt_tokens(&job.text, &tasks[job.task].instruction);
        if tokens.len() > embedder.max_tokens() {
            let _ = job.reply.send(Err(EngineError::TooLong {
                tokens: tokens.len(),
                limit: embedder.max_tokens(),
            }));
        } else {
            prompts.push(tokens);
            ok.push(job);
        }
    }
    match embedder.embed(&prompts) {
        Ok(xs) => {
            let inference_ms = started.elapsed().as_secs_f64() * 1000.0;
            for (job, x) in ok.into_iter().zip(xs) {
                let head = &heads[job.task];
                let mut ranked: Vec<(String, f32)> =
                    head.labels.iter().cloned().zip(head.predict(&x)).collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                let _ = job.reply.send(Ok(Scores {
                    ranked,
                    inference_ms,
                }));
            }
        }
        Err(e) => {
            for job in ok {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            instruction: "The intent is:".into(),
            labels: vec!["on".into(), "off".into()],
            examples: vec![
                Example {
                    text: "lights on".into(),
                    label: "on".into(),
                },
                Example {
                    text: "lights off".into(),
                    label: "off".into(),
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
        });
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.instruction.push('!');
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
        let mut t = task();
        t.labels.swap(0, 1);
        assert_ne!(base, head_key("sha", PromptFormat::Chatml, &t));
    }
}
