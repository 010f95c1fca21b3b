//! Label scoring: the `label_scoring` classification strategy.
//!
//! The model is shown the task's instruction, the list of labels and a few
//! labelled examples as earlier chat turns; that prefix is decoded once per
//! task into its own KV sequence. A request copies it, decodes the user's
//! turn, and then every label is scored as the assistant's reply: the sum of
//! the log-probabilities of the label's tokens and the end-of-turn token.
//! All labels are scored in one decode, one sequence per label, each copied
//! from the request's sequence. Nothing is generated, so the answer is always
//! one of the labels; the softmax over the label scores is the confidence.
//!
//! This needs logits, so it runs in a context of its own (the embedding
//! context outputs hidden states for every token instead).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::{EngineError, TaskSpec};
use crate::models::PromptFormat;

/// The most labels a scored task may have (one sequence each).
pub const MAX_LABELS: usize = 64;

/// The input whose label scores are each label's prior.
const CONTENT_FREE: &str = "N/A";

/// Examples per label shown in the prompt.
pub const SHOTS_PER_LABEL: usize = 2;

struct Prompt {
    /// Tokens of the task's fixed prompt (in the task's own sequence).
    prefix_len: usize,
    /// Closes the user's turn and opens the reply.
    turn_end: Vec<LlamaToken>,
    /// Each label's reply tokens, ending with the end-of-turn token.
    labels: Vec<Vec<LlamaToken>>,
    /// Each label's score for a content-free input, subtracted from every
    /// score: a few-shot prompt favours some labels whatever the input (the
    /// last shown, the shortest), and this removes that prior ("contextual
    /// calibration").
    prior: Vec<f32>,
}

pub struct Scorer<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    prompts: Vec<Option<Prompt>>,
    work: i32,
}

pub(super) fn turns(
    format: PromptFormat,
) -> (&'static str, &'static str, &'static str, &'static str) {
    // (system open, user open, turn end + reply open, reply end)
    match format {
        PromptFormat::Chatml => (
            "<|im_start|>system\n",
            "<|im_start|>user\n",
            "<|im_end|>\n<|im_start|>assistant\n",
            "<|im_end|>\n",
        ),
        PromptFormat::Gemma => (
            "<start_of_turn>user\n",
            "<start_of_turn>user\n",
            "<end_of_turn>\n<start_of_turn>model\n",
            "<end_of_turn>\n",
        ),
        PromptFormat::Plain => ("", "Input: ", "\nLabel: ", "\n\n"),
    }
}

/// The fixed prompt of a scored task: instruction, labels, examples.
fn prefix_text(format: PromptFormat, task: &TaskSpec) -> String {
    let (system, user, reply, end) = turns(format);
    let mut s = format!(
        "{system}{}\nAnswer with exactly one of: {}.{end}",
        task.instruction,
        task.labels.join(", ")
    );
    for label in &task.labels {
        for ex in task
            .examples
            .iter()
            .filter(|e| &e.label == label)
            .take(SHOTS_PER_LABEL)
        {
            s.push_str(&format!("{user}{}{reply}{label}{end}", ex.text));
        }
    }
    s.push_str(user);
    s
}

impl<'m> Scorer<'m> {
    /// Decodes the prefix of every task in `scored` (indices into `tasks`).
    /// The context holds those prefixes, which stay decoded, plus `n_ctx`
    /// working cells for requests: a config with several scored tasks, or
    /// eval's folds, fits without sizing the context by hand.
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        format: PromptFormat,
        tasks: &[TaskSpec],
        scored: &[bool],
        n_ctx: u32,
        threads: i32,
    ) -> Result<Self, EngineError> {
        let vocab = model.vocab();
        let mut prefixes = Vec::with_capacity(tasks.len());
        for (task, &is_scored) in tasks.iter().zip(scored) {
            if !is_scored {
                prefixes.push(None);
                continue;
            }
            if task.labels.len() > MAX_LABELS {
                return Err(EngineError::Training {
                    task: task.name.clone(),
                    message: format!("label scoring takes at most {MAX_LABELS} labels"),
                });
            }
            let mut prefix = Vec::new();
            if vocab.should_add_bos() {
                prefix.push(vocab.bos());
            }
            prefix.extend(vocab.tokenize(prefix_text(format, task).as_bytes(), false, true));
            prefixes.push(Some(prefix));
        }
        let cached: usize = prefixes.iter().flatten().map(Vec::len).sum();
        let params = super::context_params(
            super::beside(cached, n_ctx),
            tasks.len() + 1 + MAX_LABELS,
            threads,
        );
        let mut ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let (_, _, reply, end) = turns(format);
        let mut prompts = Vec::with_capacity(tasks.len());
        for (i, (task, prefix)) in tasks.iter().zip(prefixes).enumerate() {
            let Some(prefix) = prefix else {
                prompts.push(None);
                continue;
            };
            let mut batch = LlamaBatch::new(prefix.len(), 1);
            for (pos, &t) in prefix.iter().enumerate() {
                batch
                    .add(t, pos as i32, &[i as i32], pos + 1 == prefix.len())
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Decode(format!("task {} prompt: {e}", task.name)))?;
            let end_token = vocab.tokenize(end.trim_end().as_bytes(), false, true);
            prompts.push(Some(Prompt {
                prefix_len: prefix.len(),
                turn_end: vocab.tokenize(reply.as_bytes(), false, true),
                labels: task
                    .labels
                    .iter()
                    .map(|l| {
                        let mut t = vocab.tokenize(l.as_bytes(), false, false);
                        t.extend_from_slice(&end_token);
                        t
                    })
                    .collect(),
                prior: vec![0.0; task.labels.len()],
            }));
        }
        let mut scorer = Scorer {
            model,
            ctx,
            prompts,
            work: tasks.len() as i32,
        };
        for i in 0..tasks.len() {
            if scorer.prompts[i].is_some() {
                let (prior, _) = scorer.score(i, CONTENT_FREE)?;
                scorer.prompts[i].as_mut().expect("scored").prior = prior;
            }
        }
        Ok(scorer)
    }

    /// Log-probability of each label of task `task` as the reply to `text`,
    /// less the label's prior.
    pub fn score(&mut self, task: usize, text: &str) -> Result<(Vec<f32>, usize), EngineError> {
        let decode = |e: String| EngineError::Decode(e);
        let (prefix_len, labels, prior) = match &self.prompts[task] {
            Some(p) => (p.prefix_len, p.labels.clone(), p.prior.clone()),
            None => return Err(decode("task is not scored by labels".into())),
        };
        let mut request = self.model.vocab().tokenize(text.as_bytes(), false, false);
        request.extend_from_slice(&self.prompts[task].as_ref().unwrap().turn_end);
        let room = self.ctx.n_ctx() as usize;
        let label_tokens: usize = labels.iter().map(Vec::len).sum();
        let used = self
            .prompts
            .iter()
            .flatten()
            .map(|q| q.prefix_len)
            .sum::<usize>();
        if used + request.len() + label_tokens > room {
            return Err(EngineError::TooLong {
                tokens: request.len(),
                limit: room.saturating_sub(used + label_tokens),
            });
        }
        let work = self.work;
        self.clear(work, labels.len())?;
        self.ctx
            .copy_kv_cache_seq(task as i32, work, None, None)
            .map_err(|e| decode(e.to_string()))?;
        let mut batch = LlamaBatch::new(request.len(), 1);
        for (i, &t) in request.iter().enumerate() {
            batch
                .add(t, (prefix_len + i) as i32, &[work], i + 1 == request.len())
                .map_err(|e| decode(e.to_string()))?;
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| decode(e.to_string()))?;
        let mut scores: Vec<f32> = {
            let first = log_softmax_at(self.ctx.get_logits_ith(request.len() as i32 - 1));
            labels.iter().map(|l| first(l[0])).collect()
        };

        // Every label's later tokens, each label in its own copy of the
        // request's sequence, in one decode.
        let start = prefix_len + request.len();
        let rest: usize = labels.iter().map(|l| l.len() - 1).sum();
        if rest > 0 {
            let mut batch = LlamaBatch::new(rest, 1);
            let mut at = Vec::new();
            for (j, l) in labels.iter().enumerate() {
                let seq = work + 1 + j as i32;
                self.ctx
                    .copy_kv_cache_seq(work, seq, None, None)
                    .map_err(|e| decode(e.to_string()))?;
                for (k, &t) in l[..l.len() - 1].iter().enumerate() {
                    at.push((j, l[k + 1], batch.n_tokens()));
                    batch
                        .add(t, (start + k) as i32, &[seq], true)
                        .map_err(|e| decode(e.to_string()))?;
                }
            }
            self.ctx
                .decode(&mut batch)
                .map_err(|e| decode(e.to_string()))?;
            for (j, next, idx) in at {
                scores[j] += log_softmax_at(self.ctx.get_logits_ith(idx))(next);
            }
        }
        self.clear(work, labels.len())?;
        let logp = scores.iter().zip(prior).map(|(s, p)| s - p).collect();
        Ok((logp, request.len() + rest))
    }

    fn clear(&mut self, work: i32, labels: usize) -> Result<(), EngineError> {
        for seq in work..=work + labels as i32 {
            self.ctx
                .clear_kv_cache_seq(Some(seq as u32), None, None)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        Ok(())
    }
}

/// `token -> log p(token)` under `logits`.
fn log_softmax_at(logits: &[f32]) -> impl Fn(LlamaToken) -> f32 + '_ {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    move |t: LlamaToken| logits[t.0 as usize] - log_sum
}
