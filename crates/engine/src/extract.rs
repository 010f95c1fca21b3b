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
/// The smallest context a generator is given.
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
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        format: PromptFormat,
        n_ctx: u32,
        threads: i32,
    ) -> Result<Self, EngineError> {
        let n_ctx = n_ctx.max(MIN_CONTEXT);
        let params =
            super::context_params(n_ctx, CACHED_PROMPTS + MAX_REQUESTS, threads).with_n_ubatch(512);
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
        })
    }

    /// Whether `prompts` all fit in the prompt cache at once.
    pub fn fits(&self, prompts: &[&IntentPrompt]) -> bool {
        let cells: usize = prompts.iter().map(|p| self.prompt_tokens(p).len()).sum();
        prompts.len() <= CACHED_PROMPTS && cells <= self.budget
    }

    /// Decodes `prompts` (key, prompt) into the cache now.
    pub fn warm(&mut self, prompts: &[(u64, &IntentPrompt)]) -> Result<(), EngineError> {
        let requests: Vec<Request<'_>> = prompts
            .iter()
            .map(|&(key, prompt)| Request {
                key,
                prompt,
                text: "",
            })
            .collect();
        self.ensure_prompts(requests.iter()).map(drop)
    }

    fn prompt_tokens(&self, prompt: &IntentPrompt) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        if vocab.should_add_bos() {
            tokens.push(vocab.bos());
        }
        tokens.extend(vocab.tokenize(prompt.text.as_bytes(), false, true));
        tokens
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
        let prompts = self.ensure_prompts(requests.iter().map(|(r, _)| *r))?;
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
                l.result = Some(Err(decode_err(format!(
                    "the reply did not end within {MAX_NEW_TOKENS} tokens"
                ))));
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

    /// The sequence and length of each request's intent prompt, decoding the
    /// ones not cached (evicting the least recently used).
    fn ensure_prompts<'r, 'p: 'r>(
        &mut self,
        requests: impl Iterator<Item = &'r Request<'p>>,
    ) -> Result<Vec<(usize, Vec<LlamaToken>)>, EngineError> {
        self.clock += 1;
        let mut out = Vec::new();
        let mut batch_tokens: Vec<(usize, Vec<LlamaToken>)> = Vec::new();
        for r in requests {
            if let Some(seq) = self.find(r.key) {
                let c = self.cached[seq].as_mut().expect("found");
                c.used = self.clock;
                out.push((seq, c.tokens.clone()));
                continue;
            }
            let tokens = self.prompt_tokens(r.prompt);
            let seq = self.make_room(tokens.len())?;
            self.cached[seq] = Some(Cached {
                key: r.key,
                tokens: tokens.clone(),
                used: self.clock,
            });
            out.push((seq, tokens.clone()));
            batch_tokens.push((seq, tokens));
        }
        if batch_tokens.is_empty() {
            return Ok(out);
        }
        let total: usize = batch_tokens.iter().map(|(_, t)| t.len()).sum();
        let mut batch = LlamaBatch::new(total, batch_tokens.len() as i32);
        for (seq, tokens) in &batch_tokens {
            for (pos, &t) in tokens.iter().enumerate() {
                batch
                    .add(t, pos as i32, &[*seq as i32], false)
                    .map_err(decode_err)?;
            }
        }
        let t0 = std::time::Instant::now();
        let r = self.ctx.decode(&mut batch);
        log::debug!(
            "{} intent prompt(s), {total} tokens, decoded in {:.1} ms",
            batch_tokens.len(),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        if let Err(e) = r {
            // Leave nothing half-cached behind.
            for (seq, _) in &batch_tokens {
                self.cached[*seq] = None;
                let _ = self.clear(*seq as i32);
            }
            return Err(decode_err(format!("intent prompts: {e}")));
        }
        Ok(out)
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
