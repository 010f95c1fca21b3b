//! Hidden states from llama.cpp: the features the heads classify.
//!
//! Every task has a fixed prompt prefix (the chat template's opening and the
//! task's instruction). It is decoded once, at start-up, into a KV sequence
//! of its own (sequence `t` for task `t`). A request copies that sequence
//! into a working sequence (the cache is unified, so the copy shares cells
//! rather than duplicating them) and decodes only its own text, the end of
//! the user turn and the task's cue. Its features ([`pool`]) are the mean of
//! its tokens' states around the task's token centre, and the state of the
//! last token: after the end of the turn (and the cue) the model has
//! gathered what it would say next.
//!
//! Template tokens are parsed with special tokens; the user's text never is,
//! so text such as `<|im_end|>` in a payload stays plain text and cannot
//! close the turn (a prompt-injection guard that costs nothing).
//!
//! Several requests are decoded together, one working sequence each, in one
//! batch, put through llama.cpp [`CHUNK`] tokens at a time: llama.cpp
//! computes a row of logits (one float per vocabulary entry, 49152 for
//! SmolLM2) for every token marked as output, and reserves room for as many
//! rows as one call has outputs. Hidden states need every token marked, so
//! an unbounded call would hold 192 KiB per token (200 MB for 1024 tokens)
//! and keep it; the chunk bounds that to [`CHUNK`] rows, whatever arrives.

use llama_cpp_2::context::params::LlamaPoolingType;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::EngineError;
use crate::models::PromptFormat;

/// Tokens put through llama.cpp per call (and its micro-batch): bounds the
/// logits it computes and keeps (see the module docs) to 12 MiB here.
pub const CHUNK: usize = 64;

/// The most requests decoded together in one batch.
pub const MAX_SEQUENCES: usize = 16;

/// How requests are decoded; the defaults are the fast path, the rest exist
/// so `slmd bench` can measure what each part is worth.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Decode each task's prefix once and copy it per request.
    pub prefix_cache: bool,
    /// Most requests per decode (1 turns batching off).
    pub max_batch: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            prefix_cache: true,
            max_batch: MAX_SEQUENCES,
        }
    }
}

/// The fixed text around an input, per prompt format.
pub struct Template {
    /// Before the input: the task's instruction, then the user turn opens.
    pub prefix: String,
    /// After the input: the user turn closes, the reply opens, then the cue.
    pub suffix: String,
}

impl Template {
    pub fn new(format: PromptFormat, instruction: &str, cue: &str) -> Template {
        // Without a cue the user turn's end token is the last one: every
        // token after the input costs per-message time.
        let (prefix, suffix) = match format {
            PromptFormat::Chatml => (
                format!("<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n"),
                match cue {
                    "" => "<|im_end|>".to_owned(),
                    _ => format!("<|im_end|>\n<|im_start|>assistant\n{cue}"),
                },
            ),
            // Gemma has no system turn: the instruction opens the user turn.
            PromptFormat::Gemma => (
                format!("<start_of_turn>user\n{instruction}\n\n"),
                match cue {
                    "" => "<end_of_turn>".to_owned(),
                    _ => format!("<end_of_turn>\n<start_of_turn>model\n{cue}"),
                },
            ),
            PromptFormat::Plain => (format!("{instruction}\n\nInput: "), format!("\n{cue}")),
        };
        Template { prefix, suffix }
    }
}

/// A task's prompt prefix, tokenised, and whether it sits in its sequence.
struct Prefix {
    tokens: Vec<LlamaToken>,
    suffix: Vec<LlamaToken>,
}

pub struct Embedder<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    prefixes: Vec<Prefix>,
    opts: DecodeOptions,
    /// Context cells for requests (beside the cached prefixes).
    room: usize,
}

/// The hidden states of one request's tokens, one row per token.
pub struct States {
    dim: usize,
    data: Vec<f32>,
}

impl States {
    fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.dim.max(1))
    }

    /// Every row but the last (the end of the user turn, pooled apart).
    fn words(&self) -> impl Iterator<Item = &[f32]> {
        let n = self.rows().len();
        self.rows().take(n.saturating_sub(1))
    }
}

/// The mean hidden state of the examples' tokens (their last ones left
/// out): what every token of this task shares, whatever it says.
pub fn centre_of<'s>(states: impl IntoIterator<Item = &'s States>) -> Vec<f32> {
    let mut sum: Vec<f64> = Vec::new();
    let mut n = 0usize;
    for s in states {
        for row in s.words() {
            if sum.is_empty() {
                sum = vec![0.0; row.len()];
            }
            sum.iter_mut()
                .zip(row)
                .for_each(|(m, &v)| *m += f64::from(v));
            n += 1;
        }
    }
    sum.iter().map(|m| (m / n.max(1) as f64) as f32).collect()
}

/// The features of one request: the mean of its tokens' hidden states, each
/// taken relative to `centre` and L2-normalised first, then the last
/// token's hidden state; each half L2-normalised, concatenated.
///
/// A small model's token states share one large component (their mean
/// points the same way whatever the word); a plain mean is dominated by it
/// and by frequent words. Subtracting the task's centre and normalising
/// each token lets every word count alike ("off" as much as "the lights").
/// The last state (after the end of the user turn) keeps what the model
/// made of the whole input. An empty `centre` subtracts nothing.
pub fn pool(states: &States, centre: &[f32]) -> Vec<f32> {
    let mut mean = vec![0.0f32; states.dim];
    let mut token = vec![0.0f32; states.dim];
    for row in states.words() {
        token.copy_from_slice(row);
        token.iter_mut().zip(centre).for_each(|(t, c)| *t -= c);
        super::head::l2_normalise(&mut token);
        mean.iter_mut().zip(&token).for_each(|(m, t)| *m += t);
    }
    let mut last = states.rows().last().map_or_else(Vec::new, <[f32]>::to_vec);
    last.resize(states.dim, 0.0);
    super::head::l2_normalise(&mut mean);
    super::head::l2_normalise(&mut last);
    mean.extend(last);
    mean
}

impl<'m> Embedder<'m> {
    /// Creates the context and decodes each template's prefix into its own
    /// sequence (sequence `i` for `templates[i]`). The context holds the
    /// cached prefixes plus `n_ctx` cells for requests.
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        templates: &[Template],
        n_ctx: u32,
        threads: i32,
        opts: DecodeOptions,
    ) -> Result<Self, EngineError> {
        let vocab = model.vocab();
        let prefixes: Vec<Prefix> = templates
            .iter()
            .map(|t| {
                let mut tokens = Vec::new();
                if vocab.should_add_bos() {
                    tokens.push(vocab.bos());
                }
                tokens.extend(vocab.tokenize(t.prefix.as_bytes(), false, true));
                Prefix {
                    tokens,
                    suffix: vocab.tokenize(t.suffix.as_bytes(), false, true),
                }
            })
            .collect();
        let cached: usize = if opts.prefix_cache {
            prefixes.iter().map(|p| p.tokens.len()).sum()
        } else {
            0
        };
        let params = super::context_params(
            super::beside(cached, n_ctx),
            templates.len() + MAX_SEQUENCES,
            threads,
        )
        .with_n_batch(CHUNK as u32)
        .with_n_ubatch(CHUNK as u32)
        .with_embeddings(true)
        .with_pooling_type(LlamaPoolingType::None);
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let mut embedder = Embedder {
            model,
            ctx,
            prefixes,
            opts,
            room: n_ctx as usize,
        };
        if opts.prefix_cache {
            embedder.cache_prefixes()?;
        }
        Ok(embedder)
    }

    fn cache_prefixes(&mut self) -> Result<(), EngineError> {
        let mut cells = Vec::new();
        for (seq, p) in self.prefixes.iter().enumerate() {
            cells.extend(run(&p.tokens, 0, seq as i32));
        }
        self.decode_chunked(&cells, false).map(drop)
    }

    /// Decodes `cells` (token, position, sequence) [`CHUNK`] at a time;
    /// with `outputs`, returns every cell's hidden state, in order.
    fn decode_chunked(&mut self, cells: &[Cell], outputs: bool) -> Result<States, EngineError> {
        let err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
        let mut batch = LlamaBatch::new(CHUNK, 1);
        let mut states = States {
            dim: 0,
            data: Vec::new(),
        };
        for chunk in cells.chunks(CHUNK) {
            batch.clear();
            for &(token, pos, seq) in chunk {
                batch
                    .add(token, pos, &[seq], outputs)
                    .map_err(|e| err(&e))?;
            }
            self.ctx.decode(&mut batch).map_err(|e| err(&e))?;
            if outputs {
                for i in 0..chunk.len() {
                    let e = self.ctx.embeddings_ith(i as i32).map_err(|e| err(&e))?;
                    states.dim = e.len();
                    states.data.extend_from_slice(e);
                }
            }
        }
        Ok(states)
    }

    /// Tokens a request decodes for `text` under task `task`: the text (never
    /// parsed for special tokens) and the task's suffix.
    pub fn request_tokens(&self, task: usize, text: &str) -> Vec<LlamaToken> {
        let mut tokens = self.model.vocab().tokenize(text.as_bytes(), false, false);
        tokens.extend_from_slice(&self.prefixes[task].suffix);
        tokens
    }

    /// The most request tokens one request may have.
    pub fn max_tokens(&self) -> usize {
        if self.opts.prefix_cache {
            self.room
        } else {
            self.room
                - self
                    .prefixes
                    .iter()
                    .map(|p| p.tokens.len())
                    .max()
                    .unwrap_or(0)
        }
    }

    /// The hidden states of each `(task, request tokens)`, in order, to be
    /// [`pool`]ed. Requests are packed into as few decodes as the context
    /// allows.
    pub fn embed(
        &mut self,
        requests: &[(usize, Vec<LlamaToken>)],
    ) -> Result<Vec<States>, EngineError> {
        let mut out = Vec::with_capacity(requests.len());
        let mut start = 0;
        while start < requests.len() {
            let mut end = start;
            let mut used = 0;
            while end < requests.len() && end - start < self.opts.max_batch.max(1) {
                let len = self.decoded_len(&requests[end]);
                if len > self.room {
                    return Err(EngineError::TooLong {
                        tokens: len,
                        limit: self.max_tokens(),
                    });
                }
                if used + len > self.room {
                    break;
                }
                used += len;
                end += 1;
            }
            out.extend(self.embed_group(&requests[start..end], used)?);
            start = end;
        }
        Ok(out)
    }

    /// Tokens a request puts through the model in this mode.
    fn decoded_len(&self, (task, tokens): &(usize, Vec<LlamaToken>)) -> usize {
        if self.opts.prefix_cache {
            tokens.len()
        } else {
            self.prefixes[*task].tokens.len() + tokens.len()
        }
    }

    fn embed_group(
        &mut self,
        requests: &[(usize, Vec<LlamaToken>)],
        total: usize,
    ) -> Result<Vec<States>, EngineError> {
        let first_work_seq = self.prefixes.len() as i32;
        let mut cells = Vec::with_capacity(total);
        for (i, (task, tokens)) in requests.iter().enumerate() {
            let seq = first_work_seq + i as i32;
            self.ctx
                .clear_kv_cache_seq(Some(seq as u32), None, None)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            let prefix = &self.prefixes[*task].tokens;
            if self.opts.prefix_cache {
                self.ctx
                    .copy_kv_cache_seq(*task as i32, seq, None, None)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                cells.extend(run(tokens, prefix.len(), seq));
            } else {
                cells.extend(run(prefix, 0, seq));
                cells.extend(run(tokens, prefix.len(), seq));
            }
        }
        let states = self.decode_chunked(&cells, true);
        // Free the working cells now, so the next group has the whole room.
        for i in 0..requests.len() {
            let seq = (first_work_seq + i as i32) as u32;
            let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
        }
        // Each request's own tokens are the last `tokens.len()` of its run.
        let states = states?;
        let mut end = 0usize;
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            end += self.decoded_len(r);
            let rows = (end - r.1.len()) * states.dim..end * states.dim;
            out.push(States {
                dim: states.dim,
                data: states.data[rows].to_vec(),
            });
        }
        Ok(out)
    }
}

/// A token to decode: the token, its position, its sequence.
type Cell = (LlamaToken, i32, i32);

/// `tokens` as sequence `seq`'s cells from position `start`.
fn run(tokens: &[LlamaToken], start: usize, seq: i32) -> impl Iterator<Item = Cell> + '_ {
    tokens
        .iter()
        .enumerate()
        .map(move |(i, &t)| (t, (start + i) as i32, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(rows: &[[f32; 3]]) -> States {
        States {
            dim: 3,
            data: rows.iter().flatten().copied().collect(),
        }
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn the_centre_averages_every_token_but_each_requests_last() {
        let a = states(&[[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [100.0, 100.0, 100.0]]);
        let b = states(&[[2.0, 6.0, 0.0], [-50.0, 0.0, 0.0]]);
        assert_eq!(centre_of([&a, &b]), vec![2.0, 2.0, 0.0]);
    }

    #[test]
    fn centring_separates_words_that_a_shared_component_hides() {
        // Two inputs that differ in one word, on top of a large component
        // every token shares.
        let last = [0.0, 1.0, 1.0];
        let on = states(&[[10.0, 1.0, 0.0], [10.0, 0.0, 0.0], last]);
        let off = states(&[[10.0, 0.0, 1.0], [10.0, 0.0, 0.0], last]);
        let half = |v: Vec<f32>| v[..3].to_vec();
        let plain = cosine(&half(pool(&on, &[])), &half(pool(&off, &[])));
        assert!(plain > 0.99, "the shared component dominates: {plain}");
        let centre = centre_of([&on, &off]);
        let centred = cosine(&half(pool(&on, &centre)), &half(pool(&off, &centre)));
        assert!(centred < 0.5, "the differing word decides: {centred}");
        // The second half is the last token's state, normalised.
        let x = pool(&on, &centre);
        let s = 2f32.sqrt().recip();
        assert_eq!(x.len(), 6);
        assert!((x[4] - s).abs() < 1e-6 && (x[5] - s).abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn an_input_of_no_words_pools_to_zeros_not_nan() {
        let x = pool(&states(&[[0.0, 3.0, 4.0]]), &[1.0, 1.0, 1.0]);
        assert_eq!(x, vec![0.0, 0.0, 0.0, 0.0, 0.6, 0.8]);
    }
}
