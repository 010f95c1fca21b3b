//! Slot generation for `kind = "extract"` tasks, under a grammar.
//!
//! The intent comes first (from the task's head or label scoring); this
//! module then fills that intent's slots. Each intent has its own prompt:
//! the task's instruction, the intent and its slot names, and the intent's
//! annotated examples as earlier chat turns, each answered with its slots as
//! compact JSON. The reply to the user's text is generated greedily under
//! the GBNF grammar of the intent's slot schema ([`super::schema::gbnf`]), so
//! it is always JSON of that schema and enum values are spelt as declared.
//!
//! Speed:
//! - Intent prompts are decoded once into KV sequences of their own and
//!   kept, least recently used first out, within a budget of context cells;
//!   a request copies its prompt's sequence and decodes only its own text.
//! - Requests in one batch generate in lockstep: each step is one decode
//!   with one token per unfinished sequence.
//! - A reply ends when its JSON object closes: the grammar allows nothing
//!   after it, so the model is not asked (one decode fewer per reply), and
//!   drafts stop there too.
//! - Greedy choice with a grammar check of the best token alone; only when
//!   the grammar rejects it is the whole vocabulary filtered (most tokens
//!   of a JSON reply are the model's own first choice).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use std::sync::Arc;

use super::ground::Grounding;
use super::kv_files::KvFiles;
use super::progress::Progress;
use super::schema::{SlotKind, SlotSpec};
use super::EngineError;
use crate::models::PromptFormat;
use slmd_core::examples::{slot_text, Example};

/// Intent prompts kept decoded at once.
pub const CACHED_PROMPTS: usize = 64;
/// Requests generated together (one sequence each).
pub const MAX_REQUESTS: usize = 16;
/// A reply longer than this many tokens is an error (the grammar bounds
/// every value, so only a schema with very many slots gets near it).
pub const MAX_NEW_TOKENS: usize = 96;
/// Most tokens guessed ahead per step ([`draft`]).
const DRAFT: usize = 8;
/// Annotated examples of an intent shown in its prompt.
pub const SHOTS: usize = 4;
/// Context cells kept for the requests being generated (their text and
/// reply); the rest hold intent prompts.
const WORK_CELLS: usize = 2048;
/// Prompt tokens decoded per call while warming (progress is reported
/// between calls).
const DECODE_GROUP: usize = 512;
/// The smallest ceiling of a generator's context (it is given less when
/// its prompts need less; see `context_for`).
pub const MIN_CONTEXT: u32 = 4096;

/// The default instruction of an extract task.
pub const DEFAULT_INSTRUCTION: &str = "You are a voice assistant. Extract the slots of the user's command as JSON. Copy values from the command; leave out slots it does not give.";

/// One intent's fixed prompt and the grammar of its reply.
#[derive(Debug, Clone)]
pub struct IntentPrompt {
    pub text: String,
    pub grammar: String,
    /// The intent's slots, in task schema order.
    pub slots: Vec<SlotSpec>,
    /// What the task's examples teach about its slots (shared by its
    /// intents).
    pub grounding: Arc<Grounding>,
    /// False when grounding alone reads this intent's slots
    /// ([`Grounding::reads_all`]): its replies are not generated.
    pub generate: bool,
}

impl IntentPrompt {
    /// The prompt for `intent`: `slots` are the slots it may fill (a subset
    /// of the task's schema, in schema order); its annotated `examples` are
    /// shown answered.
    pub fn new(
        format: PromptFormat,
        instruction: &str,
        intent: &str,
        slots: Vec<SlotSpec>,
        grounding: Arc<Grounding>,
        examples: &[&Example],
    ) -> IntentPrompt {
        let (system, user, reply, end) = super::scorer::turns(format);
        let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        let mut text = format!(
            "{system}{instruction}\nIntent: {intent}. Slots: {}.{end}",
            names.join(", ")
        );
        for ex in examples.iter().take(SHOTS) {
            let json = shot_json(&slots, ex);
            text.push_str(&format!("{user}{}{reply}{json}{end}", ex.text));
        }
        text.push_str(user);
        IntentPrompt {
            grammar: super::schema::gbnf(&slots),
            text,
            slots,
            grounding,
            generate: true,
        }
    }
}

/// An example's slots as the grammar would write them: schema order, no
/// spaces, numbers as numbers.
fn shot_json(slots: &[SlotSpec], ex: &Example) -> String {
    let Some(given) = &ex.slots else {
        return "{}".into();
    };
    let members: Vec<String> = slots
        .iter()
        .filter_map(|s| {
            let text = slot_text(given.get(&s.name)?)?;
            let value = match (&s.kind, text.parse::<f64>()) {
                (SlotKind::Number, Ok(x)) => serde_json::json!(x),
                _ => serde_json::json!(text),
            };
            Some(format!("{}:{value}", serde_json::json!(s.name)))
        })
        .collect();
    format!("{{{}}}", members.join(","))
}

/// One generation: the intent prompt (by a key unique to it), the user's
/// text.
pub struct Request<'a> {
    pub key: u64,
    pub prompt: &'a IntentPrompt,
    pub text: &'a str,
}

/// A reply and the tokens its request put through the model (request
/// tokens plus reply tokens; the cached intent prompt is not counted).
#[derive(Debug)]
pub struct Generated {
    pub text: String,
    pub tokens: usize,
}

/// How intent prompts missing from the cache were brought in.
#[derive(Debug, Default, PartialEq)]
pub struct Brought {
    /// Loaded from their saved files ([`KvFiles`]).
    pub restored: usize,
    pub decoded: usize,
    /// Tokens of the decoded ones.
    pub tokens: usize,
    /// Time taken, restoring, decoding and saving.
    pub ms: f64,
}

impl std::ops::AddAssign for Brought {
    fn add_assign(&mut self, other: Brought) {
        self.restored += other.restored;
        self.decoded += other.decoded;
        self.tokens += other.tokens;
        self.ms += other.ms;
    }
}

impl std::fmt::Display for Brought {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "intent prompts: {} restored from disk, {} decoded ({} tokens), in {:.0} ms",
            self.restored, self.decoded, self.tokens, self.ms
        )
    }
}

/// The tokens of an intent prompt.
fn prompt_tokens(model: &LlamaModel, prompt: &IntentPrompt) -> Vec<LlamaToken> {
    let vocab = model.vocab();
    let mut tokens = Vec::new();
    if vocab.should_add_bos() {
        tokens.push(vocab.bos());
    }
    tokens.extend(vocab.tokenize(prompt.text.as_bytes(), false, true));
    tokens
}

/// The context a generator needs for prompts of these token counts, all
/// cached beside the working cells, in steps of 256 cells: no more than
/// that, as llama.cpp clears (so touches) every cell it allocates; `most`
/// when they do not all fit in it.
fn context_for(prompts: impl ExactSizeIterator<Item = usize>, most: u32) -> u32 {
    let count = prompts.len();
    // A request's reply may hold its last token and a draft beyond the
    // cells its group reserved.
    let needed = prompts.sum::<usize>() + WORK_CELLS + MAX_REQUESTS * (2 + DRAFT);
    match u32::try_from(needed.next_multiple_of(256)) {
        Ok(n) if count <= CACHED_PROMPTS && n <= most => n,
        _ => most,
    }
}

/// How many tokens every one of `runs` starts with.
fn common_prefix<'t>(mut runs: impl Iterator<Item = &'t [LlamaToken]>) -> usize {
    let Some(first) = runs.next() else { return 0 };
    runs.fold(first.len(), |n, r| {
        first[..n].iter().zip(r).take_while(|(a, b)| a == b).count()
    })
}

/// A sequence and the tokens it holds.
type SeqTokens = (usize, Vec<LlamaToken>);

struct Cached {
    key: u64,
    tokens: Vec<LlamaToken>,
    used: u64,
}

pub struct Generator<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// Closes the user turn and opens the reply.
    turn_end: Vec<LlamaToken>,
    /// Sequence `i` holds `cached[i]`'s prompt.
    cached: Vec<Option<Cached>>,
    clock: u64,
    /// Context cells intent prompts may take.
    budget: usize,
    /// Decodes of the current generation (for the debug log).
    decodes: usize,
    /// Where decoded prompts are saved and restored from.
    files: Option<KvFiles>,
    progress: Progress,
}

/// What one request is doing between steps.
struct Live {
    sampler: LlamaSampler,
    seq: i32,
    /// Position of the first token fed in the last batch.
    pos: usize,
    /// Indices of its logits in the last decoded batch: the chosen token's,
    /// then each draft token's.
    logits: Vec<i32>,
    /// Tokens guessed to follow the chosen one, checked in the same decode.
    draft: Vec<LlamaToken>,
    /// Prompt, request and reply tokens so far (where drafts come from).
    history: Vec<LlamaToken>,
    bytes: Vec<u8>,
    /// Where the reply's JSON stands (has its object closed?).
    json: JsonEnd,
    generated: usize,
    /// Request tokens fed after the cached prompt.
    fed: usize,
    result: Option<Result<Generated, EngineError>>,
}

fn decode_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode(e.to_string())
}

impl<'m> Generator<'m> {
    /// A generator for `prompts` (of every task) with `opts`' settings;
    /// prompts are saved under `opts.head_cache` when it is set, named
    /// with `model_id` (what identifies `model`'s weights).
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        model_id: &str,
        opts: &super::EngineOptions,
        prompts: &[&IntentPrompt],
    ) -> Result<Self, EngineError> {
        let format = opts.format;
        let threads = super::threads(opts.threads);
        let n_ctx = context_for(
            prompts.iter().map(|p| prompt_tokens(model, p).len()),
            opts.extract_context.max(MIN_CONTEXT),
        );
        let params =
            super::context_params(n_ctx, CACHED_PROMPTS + MAX_REQUESTS, threads).with_n_ubatch(512);
        // What a saved sequence's cells depend on besides model and tokens
        // (not the context's size: a sequence is saved cell by cell).
        let layout = format!(
            "generator n_ubatch=512 n_seq_max={} kv_unified f16",
            CACHED_PROMPTS + MAX_REQUESTS
        );
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let (_, _, reply, _) = super::scorer::turns(format);
        Ok(Generator {
            model,
            ctx,
            turn_end: model.vocab().tokenize(reply.as_bytes(), false, true),
            cached: (0..CACHED_PROMPTS).map(|_| None).collect(),
            clock: 0,
            budget: n_ctx as usize - WORK_CELLS,
            decodes: 0,
            files: opts
                .head_cache
                .as_ref()
                .map(|dir| KvFiles::new(&dir.join("prompts"), model_id).with_layout(&layout)),
            progress: opts.progress.clone(),
        })
    }

    /// Whether `prompts` all fit in the prompt cache at once.
    pub fn fits(&self, prompts: &[&IntentPrompt]) -> bool {
        let cells: usize = prompts.iter().map(|p| self.prompt_tokens(p).len()).sum();
        prompts.len() <= CACHED_PROMPTS && cells <= self.budget
    }

    /// Restores or decodes `prompts` (key, prompt) into the cache now.
    pub fn warm(&mut self, prompts: &[(u64, &IntentPrompt)]) -> Result<Brought, EngineError> {
        let requests: Vec<Request<'_>> = prompts
            .iter()
            .map(|&(key, prompt)| Request {
                key,
                prompt,
                text: "",
            })
            .collect();
        self.ensure_prompts(requests.iter(), true)
            .map(|(_, brought)| brought)
    }

    fn prompt_tokens(&self, prompt: &IntentPrompt) -> Vec<LlamaToken> {
        prompt_tokens(self.model, prompt)
    }

    /// Generates each request's reply, in order. Requests go in groups
    /// whose text and longest replies fit the working cells.
    pub fn generate(&mut self, requests: &[Request<'_>]) -> Vec<Result<Generated, EngineError>> {
        let limit = WORK_CELLS - MAX_NEW_TOKENS;
        let tokens: Vec<Vec<LlamaToken>> = requests
            .iter()
            .map(|r| {
                let mut t = self.model.vocab().tokenize(r.text.as_bytes(), false, false);
                t.extend_from_slice(&self.turn_end);
                t
            })
            .collect();
        let mut out: Vec<Result<Generated, EngineError>> = Vec::with_capacity(requests.len());
        let mut group: Vec<usize> = Vec::new();
        let mut cells = 0usize;
        for i in 0..=requests.len() {
            let need = tokens
                .get(i)
                .map_or(usize::MAX, |t| t.len() + MAX_NEW_TOKENS);
            let full = group.len() == MAX_REQUESTS || cells.saturating_add(need) > WORK_CELLS;
            if (full || i == requests.len()) && !group.is_empty() {
                let reqs: Vec<(&Request<'_>, &[LlamaToken])> = group
                    .iter()
                    .map(|&g| (&requests[g], tokens[g].as_slice()))
                    .collect();
                match self.generate_group(&reqs) {
                    Ok(results) => out.extend(results),
                    Err(e) => out.extend(group.iter().map(|_| Err(e.clone()))),
                }
                group.clear();
                cells = 0;
            }
            if i == requests.len() {
                break;
            }
            if tokens[i].len() > limit {
                out.push(Err(EngineError::TooLong {
                    tokens: tokens[i].len(),
                    limit,
                }));
                continue;
            }
            group.push(i);
            cells += need;
        }
        out
    }

    fn generate_group(
        &mut self,
        requests: &[(&Request<'_>, &[LlamaToken])],
    ) -> Result<Vec<Result<Generated, EngineError>>, EngineError> {
        let (prompts, brought) = self.ensure_prompts(requests.iter().map(|(r, _)| *r), false)?;
        if brought != Brought::default() {
            log::debug!("{brought}");
        }
        let mut live = Vec::with_capacity(requests.len());
        let total: usize = requests.iter().map(|(_, t)| t.len()).sum();
        let step = requests.len() * (1 + DRAFT);
        let mut batch = LlamaBatch::new(total.max(step), requests.len() as i32);
        for (i, (&(r, tokens), (prompt_seq, prompt))) in requests.iter().zip(prompts).enumerate() {
            let prompt_len = prompt.len();
            let seq = (CACHED_PROMPTS + i) as i32;
            self.clear(seq)?;
            self.ctx
                .copy_kv_cache_seq(prompt_seq as i32, seq, None, None)
                .map_err(decode_err)?;
            for (k, &t) in tokens.iter().enumerate() {
                batch
                    .add(t, (prompt_len + k) as i32, &[seq], k + 1 == tokens.len())
                    .map_err(decode_err)?;
            }
            let sampler = LlamaSampler::grammar(self.model, &r.prompt.grammar, "root")
                .map_err(|e| decode_err(format!("slot grammar: {e}")))?;
            let mut history = prompt;
            history.extend_from_slice(tokens);
            live.push(Live {
                sampler,
                seq,
                pos: history.len(),
                logits: vec![batch.n_tokens() - 1],
                draft: Vec::new(),
                history,
                bytes: Vec::new(),
                json: JsonEnd::default(),
                generated: 0,
                fed: tokens.len(),
                result: None,
            });
        }
        let t0 = std::time::Instant::now();
        let result = self.run(&mut live, batch);
        log::debug!(
            "generated {} tokens for {} request(s) in {} decodes, {:.1} ms",
            live.iter().map(|l| l.generated).sum::<usize>(),
            live.len(),
            std::mem::take(&mut self.decodes),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        for i in 0..requests.len() {
            let _ = self.clear((CACHED_PROMPTS + i) as i32);
        }
        result?;
        Ok(live
            .into_iter()
            .map(|l| l.result.expect("every request finishes"))
            .collect())
    }

    /// Steps every live request until each has its result.
    fn run(&mut self, live: &mut [Live], mut batch: LlamaBatch) -> Result<(), EngineError> {
        while batch.n_tokens() > 0 {
            self.ctx.decode(&mut batch).map_err(decode_err)?;
            self.decodes += 1;
            batch.clear();
            for l in live.iter_mut().filter(|l| l.result.is_none()) {
                let Some(next) = self.verify(l)? else {
                    continue;
                };
                l.draft = self.until_closed(draft(&l.history), l.json);
                l.logits.clear();
                for (k, &t) in std::iter::once(&next).chain(&l.draft).enumerate() {
                    l.logits.push(batch.n_tokens());
                    batch
                        .add(t, (l.pos + k) as i32, &[l.seq], true)
                        .map_err(decode_err)?;
                }
                // `next` is in the cache once decoded; the draft is on trial.
                l.pos += 1;
            }
        }
        Ok(())
    }

    /// Takes the model's choices after the last decode: the token after the
    /// fed one, then as long as each choice equals the draft, the next.
    /// Returns the token to feed next, or `None` when the request finished.
    /// Cells of rejected draft tokens are freed.
    fn verify(&mut self, l: &mut Live) -> Result<Option<LlamaToken>, EngineError> {
        let vocab = self.model.vocab();
        let mut next = None;
        for (k, &idx) in l.logits.iter().enumerate() {
            let token = self.choose(&mut l.sampler, idx);
            if vocab.is_eog(token) {
                l.result = Some(Ok(Generated {
                    text: String::from_utf8_lossy(&l.bytes).into_owned(),
                    tokens: l.fed + l.generated,
                }));
                break;
            }
            l.sampler.accept(token);
            let piece = vocab.token_to_piece(token, false, None);
            l.json.feed(&piece);
            l.bytes.extend(piece);
            l.history.push(token);
            l.generated += 1;
            if l.json.closed() {
                // The grammar allows only the end of the reply now.
                l.result = Some(Ok(Generated {
                    text: String::from_utf8_lossy(&l.bytes).into_owned(),
                    tokens: l.fed + l.generated,
                }));
                break;
            }
            if l.generated > MAX_NEW_TOKENS {
                // A small model can repeat itself inside a long value; the
                // members it finished are still an answer.
                let text = complete_members(&l.bytes);
                log::warn!(
                    "a reply did not end within {MAX_NEW_TOKENS} tokens; kept what it completed: {text}"
                );
                l.result = Some(Ok(Generated {
                    text,
                    tokens: l.fed + l.generated,
                }));
                break;
            }
            if l.draft.get(k) != Some(&token) {
                next = Some(token);
                break;
            }
            // Draft token `k` was right: its cell stays.
            l.pos += 1;
        }
        // The fed token and the accepted draft stay; the rest go.
        self.ctx
            .clear_kv_cache_seq(Some(l.seq as u32), Some(l.pos as u32), None)
            .map_err(decode_err)?;
        Ok(next.filter(|_| l.result.is_none()))
    }

    /// `draft` up to the token that would close the reply's object: what
    /// follows it is never needed.
    fn until_closed(&self, mut draft: Vec<LlamaToken>, mut json: JsonEnd) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        if let Some(k) = draft.iter().position(|&t| {
            json.feed(&vocab.token_to_piece(t, false, None));
            json.closed() || vocab.is_eog(t)
        }) {
            draft.truncate(k + 1);
        }
        draft
    }

    /// The most probable token the grammar allows after the logits at `idx`.
    fn choose(&self, grammar: &mut LlamaSampler, idx: i32) -> LlamaToken {
        let logits = self.ctx.get_logits_ith(idx);
        let best = argmax(logits);
        let mut one = LlamaTokenDataArray::new(
            vec![LlamaTokenData::new(
                LlamaToken(best as i32),
                logits[best],
                0.0,
            )],
            false,
        );
        grammar.apply(&mut one);
        if one.data[0].logit().is_finite() {
            return LlamaToken(best as i32);
        }
        let mut all = self.ctx.token_data_array_ith(idx);
        grammar.apply(&mut all);
        let allowed: Vec<f32> = all.data.iter().map(LlamaTokenData::logit).collect();
        all.data[argmax(&allowed)].id()
    }

    /// The sequence and tokens of each request's intent prompt, restoring
    /// or decoding the ones not cached (evicting the least recently used),
    /// and how the missing ones were brought in.
    fn ensure_prompts<'r, 'p: 'r>(
        &mut self,
        requests: impl Iterator<Item = &'r Request<'p>>,
        save: bool,
    ) -> Result<(Vec<SeqTokens>, Brought), EngineError> {
        let started = std::time::Instant::now();
        self.clock += 1;
        let mut out = Vec::new();
        let mut missing: Vec<SeqTokens> = Vec::new();
        let mut brought = Brought::default();
        for r in requests {
            if let Some(seq) = self.find(r.key) {
                let c = self.cached[seq].as_mut().expect("found");
                c.used = self.clock;
                out.push((seq, c.tokens.clone()));
                continue;
            }
            let tokens = self.prompt_tokens(r.prompt);
            let seq = match self.make_room(tokens.len()) {
                Ok(seq) => seq,
                Err(e) => {
                    self.forget(&missing);
                    return Err(e);
                }
            };
            self.cached[seq] = Some(Cached {
                key: r.key,
                tokens: tokens.clone(),
                used: self.clock,
            });
            out.push((seq, tokens.clone()));
            let restored = self
                .files
                .as_ref()
                .is_some_and(|f| f.restore(&mut self.ctx, seq as i32, &tokens));
            if restored {
                brought.restored += 1;
            } else {
                missing.push((seq, tokens));
            }
        }
        if let Err(e) = self.decode_prompts(&missing) {
            self.forget(&missing);
            return Err(decode_err(format!("intent prompts: {e}")));
        }
        brought.decoded = missing.len();
        brought.tokens = missing.iter().map(|(_, t)| t.len()).sum();

        // Saved while warming, not on a request's time (a save fsyncs).
        if let (Some(files), true) = (&self.files, save) {
            for (seq, tokens) in &missing {
                files.save(&self.ctx, *seq as i32, tokens);
            }
        }
        if brought.restored + brought.decoded > 0 {
            brought.ms = started.elapsed().as_secs_f64() * 1000.0;
        }
        Ok((out, brought))
    }

    /// Leaves nothing half-cached behind: `prompts` lose their sequences.
    fn forget(&mut self, prompts: &[SeqTokens]) {
        for (seq, _) in prompts {
            self.cached[*seq] = None;
            let _ = self.clear(*seq as i32);
        }
    }

    /// Decodes each `(sequence, prompt tokens)`: the tokens every prompt
    /// starts with once, copied to the others (the cache is unified, so they
    /// share those cells), then the rest, [`DECODE_GROUP`] tokens or so per
    /// call, reporting progress.
    fn decode_prompts(&mut self, prompts: &[SeqTokens]) -> Result<(), EngineError> {
        let Some(((first, first_tokens), others)) = prompts.split_first() else {
            return Ok(());
        };
        let shared = if others.is_empty() {
            0
        } else {
            common_prefix(prompts.iter().map(|(_, t)| t.as_slice()))
        };
        let total = shared + prompts.iter().map(|(_, t)| t.len() - shared).sum::<usize>();
        let progress = self.progress.clone();
        let mut step = progress.step("intent prompts: tokens decoded".into(), total);
        let first = *first as i32;
        if shared > 0 {
            self.decode_runs(&[(first, &first_tokens[..shared], 0)])?;
            step.advance(shared);
            for (seq, _) in others {
                self.ctx
                    .copy_kv_cache_seq(first, *seq as i32, None, Some(shared as u32))
                    .map_err(decode_err)?;
            }
        }
        let mut group = Vec::new();
        let mut n = 0;
        for (i, (seq, tokens)) in prompts.iter().enumerate() {
            group.push((*seq as i32, &tokens[shared..], shared));
            n += tokens.len() - shared;
            if n >= DECODE_GROUP || i + 1 == prompts.len() {
                self.decode_runs(&group)?;
                step.advance(n);
                group.clear();
                n = 0;
            }
        }
        Ok(())
    }

    /// Decodes each `(sequence, tokens, position of the first)` in one call.
    fn decode_runs(&mut self, runs: &[(i32, &[LlamaToken], usize)]) -> Result<(), EngineError> {
        let total: usize = runs.iter().map(|(_, t, _)| t.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let mut batch = LlamaBatch::new(total, 1);
        for &(seq, tokens, start) in runs {
            for (k, &t) in tokens.iter().enumerate() {
                batch
                    .add(t, (start + k) as i32, &[seq], false)
                    .map_err(decode_err)?;
            }
        }
        self.ctx.decode(&mut batch).map_err(decode_err)
    }

    /// Whether decoded prompts are saved to disk.
    pub fn saves(&self) -> bool {
        self.files.is_some()
    }

    /// Removes saved prompts other than `prompts` while they take more room
    /// than these ([`KvFiles::prune`]).
    pub fn prune_files(&self, prompts: &[&IntentPrompt]) {
        if let Some(files) = &self.files {
            let current: Vec<Vec<LlamaToken>> =
                prompts.iter().map(|p| self.prompt_tokens(p)).collect();
            files.prune(&current);
        }
    }

    fn find(&self, key: u64) -> Option<usize> {
        self.cached
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.key == key))
    }

    /// A free sequence with `len` cells to spare in the budget, evicting
    /// prompts not used by the current batch, oldest first.
    fn make_room(&mut self, len: usize) -> Result<usize, EngineError> {
        if len > self.budget {
            return Err(EngineError::TooLong {
                tokens: len,
                limit: self.budget,
            });
        }
        loop {
            let used: usize = self.cached.iter().flatten().map(|c| c.tokens.len()).sum();
            let free = self.cached.iter().position(Option::is_none);
            if let (true, Some(seq)) = (used + len <= self.budget, free) {
                return Ok(seq);
            }
            let oldest = self
                .cached
                .iter()
                .enumerate()
                .filter_map(|(i, c)| Some((i, c.as_ref()?.used)))
                .filter(|&(_, used)| used < self.clock)
                .min_by_key(|&(_, used)| used)
                .map(|(i, _)| i)
                .ok_or_else(|| decode_err("intent prompts of one batch exceed the context"))?;
            self.cached[oldest] = None;
            self.clear(oldest as i32)?;
        }
    }

    fn clear(&mut self, seq: i32) -> Result<(), EngineError> {
        self.ctx
            .clear_kv_cache_seq(Some(seq as u32), None, None)
            .map(|_| ())
            .map_err(decode_err)
    }
}

/// Tracks a JSON text byte by byte until its outermost object closes.
#[derive(Debug, Clone, Copy, Default)]
struct JsonEnd {
    depth: u32,
    opened: bool,
    in_string: bool,
    escaped: bool,
}

impl JsonEnd {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.opened = true;
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
    }

    fn closed(&self) -> bool {
        self.opened && self.depth == 0
    }
}

/// The object a reply cut short was writing, closed after its last
/// complete member (`{}` when it has none). Replies are flat objects of
/// string and number members (the grammar says so).
fn complete_members(reply: &[u8]) -> String {
    let mut json = JsonEnd::default();
    let mut end = None;
    for (i, &b) in reply.iter().enumerate() {
        let outside = !json.in_string && json.depth == 1;
        json.feed(&[b]);
        if outside && b == b',' {
            end = Some(i);
        }
    }
    match end {
        Some(i) => format!("{}}}", String::from_utf8_lossy(&reply[..i])),
        None => "{}".into(),
    }
}

/// Tokens likely to follow `history` (prompt lookup): after the latest
/// earlier place where its last three tokens occurred, the tokens that came
/// next there. A reply mostly copies the input's words
/// and the examples' JSON, so this guesses many tokens right; a wrong guess
/// costs only a few extra tokens in a decode that runs anyway.
fn draft(history: &[LlamaToken]) -> Vec<LlamaToken> {
    let n = history.len();
    if n < 4 {
        return Vec::new();
    }
    let key = &history[n - 3..];
    (0..n - 3)
        .rev()
        .find(|&i| &history[i..i + 3] == key)
        .map(|i| history[i + 3..n.min(i + 3 + DRAFT)].to_vec())
        .unwrap_or_default()
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_cut_short_keeps_its_complete_members() {
        let cut = br#"{"artist":"maki ohguro","playlist":"rock hard rock hard rock"#;
        assert_eq!(complete_members(cut), r#"{"artist":"maki ohguro"}"#);
        // A comma inside a value is not a member's end.
        let cut = br#"{"item":"eggs, milk","n":2,"note":"a, b"#;
        assert_eq!(complete_members(cut), r#"{"item":"eggs, milk","n":2}"#);
        assert_eq!(complete_members(br#"{"a":"xxxxx"#), "{}");
        assert_eq!(complete_members(b""), "{}");
    }

    #[test]
    fn the_context_holds_every_prompt_beside_the_working_cells_and_no_more() {
        let most = 8192;
        assert_eq!(context_for([100, 150].into_iter(), most), 2560);
        assert_eq!(context_for([3318].into_iter(), most), 5632);
        assert_eq!(context_for([7000].into_iter(), most), most, "too many");
        let many = vec![1; CACHED_PROMPTS + 1];
        assert_eq!(context_for(many.into_iter(), most), most);
    }

    #[test]
    fn the_shared_start_of_prompts_is_counted_in_tokens() {
        let t = |ids: &[i32]| ids.iter().map(|&i| LlamaToken(i)).collect::<Vec<_>>();
        let (a, b, c) = (t(&[1, 2, 3, 4]), t(&[1, 2, 3, 9]), t(&[1, 2]));
        assert_eq!(common_prefix([&a[..], &b[..]].into_iter()), 3);
        assert_eq!(common_prefix([&a[..], &b[..], &c[..]].into_iter()), 2);
        assert_eq!(common_prefix([&a[..]].into_iter()), 4);
        assert_eq!(common_prefix(std::iter::empty()), 0);
    }

    fn slots() -> Vec<SlotSpec> {
        vec![
            SlotSpec {
                name: "area".into(),
                kind: SlotKind::Enum {
                    values: vec!["Kitchen".into()],
                    open: false,
                },
            },
            SlotSpec {
                name: "brightness".into(),
                kind: SlotKind::Number,
            },
        ]
    }

    #[test]
    fn a_reply_ends_when_its_object_closes_whatever_its_strings_hold() {
        let closes_after = |pieces: &[&str]| {
            let mut j = JsonEnd::default();
            pieces.iter().position(|p| {
                j.feed(p.as_bytes());
                j.closed()
            })
        };
        assert_eq!(closes_after(&["{}"]), Some(0));
        assert_eq!(
            closes_after(&[" {", "\"a\": [1, {\"b\": 2}]", "}", "}"]),
            Some(2)
        );
        assert_eq!(
            closes_after(&["{\"name\": \"a } b", "\\\" {\"", "}"]),
            Some(2),
            "braces and escaped quotes inside strings do not count"
        );
        assert_eq!(closes_after(&["{\"a\": ", "\"x\""]), None);
    }

    #[test]
    fn drafts_continue_the_latest_earlier_occurrence() {
        let h: Vec<LlamaToken> = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
            .into_iter()
            .map(LlamaToken)
            .collect();
        let d: Vec<i32> = draft(&h).into_iter().map(|t| t.0).collect();
        assert_eq!(d, [7, 8, 1, 2, 3], "after the latest earlier 1 2 3");
        let h: Vec<LlamaToken> = [1, 2, 3, 4].into_iter().map(LlamaToken).collect();
        assert!(draft(&h).is_empty(), "no earlier occurrence");
    }

    #[test]
    fn examples_are_shown_as_the_grammar_would_write_them() {
        let mut given = serde_json::Map::new();
        given.insert("brightness".into(), serde_json::json!("50"));
        given.insert("area".into(), serde_json::json!(["Kitchen ", "kitchen"]));
        given.insert("colour".into(), serde_json::json!("red"));
        let ex = Example {
            text: "kitchen to half".into(),
            label: "HassLightSet".into(),
            slots: Some(given),
        };
        let json = shot_json(&slots(), &ex);
        assert_eq!(json, r#"{"area":"Kitchen","brightness":50.0}"#);
        let parsed = super::super::schema::parse_output(&slots(), &json, &ex.text).unwrap();
        assert_eq!(parsed.len(), 2, "a shown reply parses under its own schema");

        let p = IntentPrompt::new(
            PromptFormat::Chatml,
            "Extract.",
            "HassLightSet",
            slots(),
            Default::default(),
            &[&ex],
        );
        assert!(p
            .text
            .contains("Intent: HassLightSet. Slots: area, brightness."));
        assert!(p.text.contains(&format!(
            "kitchen to half<|im_end|>\n<|im_start|>assistant\n{json}<|im_end|>"
        )));
        assert!(p.text.ends_with("<|im_start|>user\n"));
        assert!(p.grammar.starts_with("root ::="));
    }
}
