//! Sentences written from the templates: random expansions with their
//! intent and slots, for training the model stage on the phrasings the
//! templates know (`slmd eval --template-samples`, the task option
//! `templates.train_samples`).

use serde_json::Value;

use crate::{Block, List, Node, Templates, Want};

/// One written sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub text: String,
    pub intent: String,
    pub slots: Vec<(String, Value)>,
}

/// What a wildcard is filled with: plain words, not a phrase of any intent.
const FILLERS: [&str; 6] = [
    "the news",
    "milk",
    "pizza",
    "dinner is ready",
    "jazz",
    "my keys",
];

/// Tries per sample before a sentence is given up on (its entities never
/// fit what it requires, say).
const TRIES: usize = 8;

impl Templates {
    /// Up to `per_sentence` distinct sentences written from each template
    /// sentence, reproducibly for a `seed`. Sentences that need the
    /// speaker's context (a slot filled from it) are skipped: their text
    /// does not say it.
    pub fn sample(&self, per_sentence: usize, seed: u64) -> Vec<Sample> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut out: Vec<Sample> = Vec::new();
        for s in &self.sentences {
            let block = &self.blocks[s.block];
            if block
                .requires
                .iter()
                .any(|(_, w)| matches!(w, Want::Slot(_)))
            {
                continue;
            }
            let mut made = 0;
            for _ in 0..per_sentence * TRIES {
                if made == per_sentence {
                    break;
                }
                let mut w = Writing::default();
                write(self, &s.node, &mut rng, &mut w);
                let text = w.text.split_whitespace().collect::<Vec<_>>().join(" ");
                if text.is_empty() || !fits(block, &w.context) || out.iter().any(|o| o.text == text)
                {
                    continue;
                }
                let mut slots = block.slots.clone();
                slots.retain(|(k, _)| !w.slots.iter().any(|(n, _)| n == k));
                slots.extend(w.slots);
                out.push(Sample {
                    text,
                    intent: block.intent.clone(),
                    slots,
                });
                made += 1;
            }
        }
        out
    }
}

#[derive(Default)]
struct Writing {
    text: String,
    slots: Vec<(String, Value)>,
    context: Vec<(String, String)>,
}

fn write(t: &Templates, node: &Node, rng: &mut Rng, w: &mut Writing) {
    match node {
        Node::Text(chars) => w.text.extend(chars),
        Node::Seq(items) => items.iter().for_each(|i| write(t, i, rng, w)),
        Node::Alt(branches) => write(t, &branches[rng.below(branches.len())], rng, w),
        Node::List { list, slot } => match &t.lists[*list] {
            List::Values(items) if !items.is_empty() => {
                let item = &items[rng.below(items.len())];
                let start = w.text.len();
                write(t, &item.node, rng, w);
                let said = w.text[start..].trim().to_owned();
                let value = item.out.clone().unwrap_or(Value::String(said));
                w.slots.push((slot.clone(), value));
                w.context.extend(item.context.iter().cloned());
            }
            List::Values(_) => {}
            List::Range(r) => {
                let step = r.step.filter(|s| *s >= 1.0).unwrap_or(1.0);
                let n = ((r.to - r.from) / step).floor().max(0.0) as usize;
                let v = r.from + step * rng.below(n + 1) as f64;
                w.text.push_str(&format!("{v}"));
                let v = v * r.multiplier.unwrap_or(1.0);
                w.slots.push((slot.clone(), Value::from(v as i64)));
            }
            List::Wildcard => {
                let filler = FILLERS[rng.below(FILLERS.len())];
                w.text.push_str(filler);
                w.slots
                    .push((slot.clone(), Value::String(filler.to_owned())));
            }
        },
    }
}

/// Whether what the written sentence's entities say fits the block.
fn fits(block: &Block, context: &[(String, String)]) -> bool {
    let value = |k: &str| {
        context
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let is = |want: &Want, v: Option<&str>| match (want, v) {
        (_, None) => false,
        (Want::OneOf(vs), Some(v)) => vs.iter().any(|x| x == v),
        (Want::Any | Want::Slot(_), Some(_)) => true,
    };
    block.requires.iter().all(|(k, w)| is(w, value(k)))
        && !block.excludes.iter().any(|(k, w)| is(w, value(k)))
}

/// splitmix64: reproducible, not cryptographic.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}
