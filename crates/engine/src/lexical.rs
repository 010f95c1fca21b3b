//! Surface features of the text itself: hashed word unigrams and bigrams and
//! character n-grams of each word, sub-linear term frequency, L2-normalised.
//!
//! A small model's hidden state knows what a sentence is about but blurs
//! words that decide an intent ("on" and "off", "dim" and "bright"); these
//! features keep them sharp. The head learns one weight vector over both.
//! Costs microseconds per message and needs no vocabulary file: n-grams are
//! hashed (FNV-1a, with a sign bit against collision bias) into [`DIM`]
//! buckets.

/// Buckets of the hashed feature vector.
pub const DIM: usize = 2048;

/// Feature vector of `text`, length [`DIM`], L2-normalised (all zero for
/// text without letters or digits).
pub fn features(text: &str) -> Vec<f32> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = words(&lower).collect();
    let mut counts = std::collections::HashMap::<u64, f32>::new();
    let mut add = |parts: &[&str]| {
        *counts.entry(fnv(parts)).or_default() += 1.0;
    };
    for (i, w) in words.iter().enumerate() {
        add(&["w", w]);
        if let Some(next) = words.get(i + 1) {
            add(&["b", w, next]);
        }
        let padded: Vec<char> = format!("<{w}>").chars().collect();
        for n in 3..=5 {
            for gram in padded.windows(n) {
                let g: String = gram.iter().collect();
                add(&["c", &g]);
            }
        }
    }
    let mut v = vec![0.0f32; DIM];
    for (h, tf) in counts {
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        v[(h % DIM as u64) as usize] += sign * (1.0 + tf.ln());
    }
    super::head::l2_normalise(&mut v);
    v
}

/// The words of `text`: its runs of letters and digits (the caller
/// lower-cases it first).
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::dot;

    #[test]
    fn unit_length_and_case_insensitive() {
        let a = features("Turn ON the lights");
        let b = features("turn on the LIGHTS");
        assert_eq!(a.len(), DIM);
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        assert!((dot(&a, &b) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn shared_words_are_closer_than_different_ones() {
        let on = features("turn the kitchen lights on");
        let on2 = features("kitchen lights on please");
        let coffee = features("make me a coffee");
        assert!(dot(&on, &on2) > dot(&on, &coffee) + 0.2);
    }

    #[test]
    fn text_without_words_is_all_zero() {
        assert!(features("?! ...").iter().all(|&x| x == 0.0));
    }
}
