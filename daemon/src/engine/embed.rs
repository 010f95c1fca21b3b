//! Pooled hidden states from llama.cpp: the features the heads classify.
//!
//! Each input is wrapped in the model's chat format and followed by the
//! task's instruction, and the hidden state of the *last* token is taken:
//! after "The intent of this command is:" the model has gathered what it
//! would say next, which separates intents better than averaging the tokens
//! of the bare text (measured; see docs/EVAL.md).
//!
//! The template's own tokens are parsed with special tokens; the user's text
//! never is, so text such as `<|im_end|>` in a payload stays plain text and
//! cannot close the turn (a prompt-injection guard that costs nothing).
//!
//! Several inputs are decoded together, one sequence each, in one batch.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::EngineError;
use crate::models::PromptFormat;

/// The most inputs decoded together in one batch.
pub const MAX_SEQUENCES: usize = 16;

pub struct Embedder<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    format: PromptFormat,
    n_ctx: usize,
}

impl<'m> Embedder<'m> {
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        format: PromptFormat,
        n_ctx: u32,
        threads: i32,
    ) -> Result<Self, EngineError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_seq_max(MAX_SEQUENCES as u32)
            .with_kv_unified(true)
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::Last)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        Ok(Embedder {
            model,
            ctx,
            format,
            n_ctx: n_ctx as usize,
        })
    }

    /// Tokens of `text` inside the prompt template, ending in `instruction`.
    pub fn prompt_tokens(&self, text: &str, instruction: &str) -> Vec<LlamaToken> {
        let (before, after) = match self.format {
            PromptFormat::Chatml => ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
            PromptFormat::Gemma => (
                "<start_of_turn>user\n",
                "<end_of_turn>\n<start_of_turn>model\n",
            ),
            PromptFormat::Plain => ("", "\n"),
        };
        let vocab = self.model.vocab();
        let mut tokens = Vec::with_capacity(64);
        if vocab.should_add_bos() {
            tokens.push(vocab.bos());
        }
        tokens.extend(vocab.tokenize(before.as_bytes(), false, true));
        tokens.extend(vocab.tokenize(text.as_bytes(), false, false));
        tokens.extend(vocab.tokenize(after.as_bytes(), false, true));
        tokens.extend(vocab.tokenize(instruction.as_bytes(), false, false));
        tokens
    }

    /// The longest prompt, in tokens, that fits the context.
    pub fn max_tokens(&self) -> usize {
        self.n_ctx
    }

    /// One L2-normalised embedding per prompt, in order. Prompts are packed
    /// into as few decodes as the context allows.
    pub fn embed(&mut self, prompts: &[Vec<LlamaToken>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = Vec::with_capacity(prompts.len());
        let mut start = 0;
        while start < prompts.len() {
            let mut end = start;
            let mut used = 0;
            while end < prompts.len() && end - start < MAX_SEQUENCES {
                let len = prompts[end].len();
                if len > self.n_ctx {
                    return Err(EngineError::TooLong {
                        tokens: len,
                        limit: self.n_ctx,
                    });
                }
                if used + len > self.n_ctx {
                    break;
                }
                used += len;
                end += 1;
            }
            out.extend(self.embed_group(&prompts[start..end], used)?);
            start = end;
        }
        Ok(out)
    }

    fn embed_group(
        &mut self,
        prompts: &[Vec<LlamaToken>],
        total: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        self.ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(total.max(1), prompts.len() as i32);
        for (seq, tokens) in prompts.iter().enumerate() {
            let last = tokens.len().saturating_sub(1);
            for (pos, &tok) in tokens.iter().enumerate() {
                batch
                    .add(tok, pos as i32, &[seq as i32], pos == last)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        (0..prompts.len())
            .map(|seq| {
                let mut v = self
                    .ctx
                    .embeddings_seq_ith(seq as i32)
                    .map_err(|e| EngineError::Decode(e.to_string()))?
                    .to_vec();
                super::head::l2_normalise(&mut v);
                Ok(v)
            })
            .collect()
    }
}
