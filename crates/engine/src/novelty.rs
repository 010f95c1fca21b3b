//! How unlike a task's examples an input is: the out-of-scope guard that
//! needs no out-of-scope examples.
//!
//! A head always picks one of its labels, however far the input is from
//! all of them. The novelty score says how far: the cosine of the input's
//! pooled hidden state to the nearest label centroid, and the cosine of its
//! word and character n-grams to the nearest single example, each
//! standardised by what the examples themselves score (each left out of
//! what it is compared with) and added. An input scoring below all but a
//! share `q` of the examples (`novelty_quantile`) is not recognised.
//!
//! Both parts matter (docs/EVAL.md, "Out of scope"): the hidden state
//! knows meaning, the n-grams know the task's vocabulary; on the CLINC dev
//! rows, with no out-of-scope row in training, the two together separate
//! held-out in-scope rows from out-of-scope ones better than either alone.

use serde::{Deserialize, Serialize};

use crate::head::dot;

/// The smallest spread a part's scores are divided by (cosines).
const SD_FLOOR: f32 = 0.01;

/// The fewest examples a task needs for a novelty score.
pub const MIN_EXAMPLES: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Novelty {
    /// Per label with examples, the normalised mean of their hidden states.
    centroids: Vec<Vec<f32>>,
    /// Every example's n-gram vector, as (column, value) pairs.
    lexical: Vec<Vec<(u32, f32)>>,
    /// Mean and standard deviation of each part's left-out scores.
    scale: [(f32, f32); 2],
    /// Every example's left-out score, ascending.
    left_out: Vec<f32>,
}

impl Novelty {
    /// From the examples' pooled hidden states (as [`crate::embed::pool`]
    /// makes them: both parts compare them by their dot product with unit
    /// centroids, so their own norm cancels out of the standardisation),
    /// L2-normalised n-gram vectors and label indices; `None` with fewer
    /// than [`MIN_EXAMPLES`], too few to say what is typical of them.
    pub fn fit(hidden: &[&[f32]], lexical: &[&[f32]], ys: &[usize]) -> Option<Novelty> {
        let n = hidden.len();
        if n < MIN_EXAMPLES {
            return None;
        }
        let labels = ys.iter().max().map_or(0, |m| m + 1);
        let dim = hidden[0].len();
        let mut sums = vec![vec![0.0f32; dim]; labels];
        let mut counts = vec![0usize; labels];
        for (h, &y) in hidden.iter().zip(ys) {
            sums[y].iter_mut().zip(*h).for_each(|(s, v)| *s += v);
            counts[y] += 1;
        }
        let norms: Vec<f32> = sums.iter().map(|s| dot(s, s).sqrt()).collect();
        let lexical: Vec<Vec<(u32, f32)>> = lexical.iter().map(|v| sparse(v)).collect();
        // Each example against the centroids without it, and against the
        // other examples' n-grams. Its own label's centroid without it is
        // that label's sum minus itself: h.(s - h) / |s - h|, with
        // |s - h|^2 = |s|^2 - 2 h.s + |h|^2.
        let mut parts = [Vec::with_capacity(n), Vec::with_capacity(n)];
        for (i, h) in hidden.iter().enumerate() {
            let own = ys[i];
            let hh = dot(h, h);
            let mut best = f32::NEG_INFINITY;
            for (k, sum) in sums.iter().enumerate() {
                let hs = dot(h, sum);
                let (along, norm) = if k == own {
                    if counts[k] == 1 {
                        continue;
                    }
                    let left = norms[k] * norms[k] - 2.0 * hs + hh;
                    (hs - hh, left.max(0.0).sqrt())
                } else if counts[k] == 0 {
                    continue;
                } else {
                    (hs, norms[k])
                };
                best = best.max(if norm > 0.0 { along / norm } else { 0.0 });
            }
            parts[0].push(if best.is_finite() { best } else { 0.0 });
            let nearest = (0..n)
                .filter(|&j| j != i)
                .map(|j| sparse_dot(&lexical[i], &lexical[j]))
                .fold(f32::NEG_INFINITY, f32::max);
            parts[1].push(nearest);
        }
        let scale = [mean_sd(&parts[0]), mean_sd(&parts[1])];
        let centroids = sums
            .into_iter()
            .zip(&counts)
            .filter(|(_, &c)| c > 0)
            .map(|(mut s, _)| {
                crate::head::l2_normalise(&mut s);
                s
            })
            .collect();
        let mut left_out: Vec<f32> = (0..n)
            .map(|i| standardised(&scale, parts[0][i], parts[1][i]))
            .collect();
        left_out.sort_by(f32::total_cmp);
        Some(Novelty {
            centroids,
            lexical,
            scale,
            left_out,
        })
    }

    /// The score below which an input is novel: the `q` quantile of the
    /// examples' own left-out scores (below all of them for 0).
    pub fn threshold(&self, q: f32) -> f32 {
        let Some(last) = self.left_out.len().checked_sub(1) else {
            return f32::NEG_INFINITY;
        };
        if q.is_nan() || q <= 0.0 {
            return f32::NEG_INFINITY;
        }
        self.left_out[((q.min(1.0) * last as f32).round() as usize).min(last)]
    }

    /// The input's score (higher is more like the examples).
    pub fn score(&self, hidden: &[f32], lexical: &[f32]) -> f32 {
        let meaning = self
            .centroids
            .iter()
            .map(|c| dot(hidden, c))
            .fold(f32::NEG_INFINITY, f32::max);
        let words = sparse(lexical);
        let wording = self
            .lexical
            .iter()
            .map(|e| sparse_dot(&words, e))
            .fold(f32::NEG_INFINITY, f32::max);
        standardised(&self.scale, meaning, wording)
    }
}

fn standardised(scale: &[(f32, f32); 2], meaning: f32, wording: f32) -> f32 {
    (meaning - scale[0].0) / scale[0].1 + (wording - scale[1].0) / scale[1].1
}

fn mean_sd(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    // A floor on the spread: examples that all have a near-duplicate
    // would otherwise make a tiny difference count thousands of times.
    (mean, var.sqrt().max(SD_FLOOR))
}

fn sparse(v: &[f32]) -> Vec<(u32, f32)> {
    v.iter()
        .enumerate()
        .filter(|(_, x)| **x != 0.0)
        .map(|(i, x)| (i as u32, *x))
        .collect()
}

/// The dot product of two sparse vectors sorted by column.
fn sparse_dot(a: &[(u32, f32)], b: &[(u32, f32)]) -> f32 {
    let (mut i, mut j, mut sum) = (0, 0, 0.0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                sum += a[i].1 * b[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(Vec::as_slice).collect()
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        crate::head::l2_normalise(&mut v);
        v
    }

    #[test]
    fn an_input_unlike_every_example_scores_below_the_examples() {
        // Two labels, each a tight cluster in both parts.
        let hidden: Vec<Vec<f32>> = [
            [1.0, 0.1, 0.0],
            [1.0, 0.0, 0.1],
            [0.9, 0.1, 0.1],
            [0.95, 0.05, 0.05],
            [1.0, 0.05, 0.0],
            [0.0, 1.0, 0.1],
            [0.1, 1.0, 0.0],
            [0.1, 0.9, 0.1],
            [0.05, 1.0, 0.05],
            [0.0, 0.95, 0.05],
        ]
        .iter()
        .map(|v| unit(v))
        .collect();
        let lexical: Vec<Vec<f32>> = [
            [1.0, 1.0, 0.0, 0.0, 0.0],
            [1.0, 0.8, 0.1, 0.0, 0.0],
            [0.9, 1.0, 0.0, 0.0, 0.0],
            [1.0, 0.9, 0.0, 0.1, 0.0],
            [0.8, 1.0, 0.1, 0.0, 0.0],
            [0.0, 0.0, 1.0, 1.0, 0.0],
            [0.0, 0.1, 1.0, 0.9, 0.0],
            [0.0, 0.0, 0.8, 1.0, 0.0],
            [0.1, 0.0, 1.0, 0.8, 0.0],
            [0.0, 0.0, 0.9, 1.0, 0.1],
        ]
        .iter()
        .map(|v| unit(v))
        .collect();
        let ys = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
        let n = Novelty::fit(&refs(&hidden), &refs(&lexical), &ys).unwrap();
        let like = n.score(&unit(&[1.0, 0.05, 0.05]), &unit(&[1.0, 0.9, 0.0, 0.0, 0.0]));
        let unlike = n.score(&unit(&[0.0, 0.0, 1.0]), &unit(&[0.0, 0.0, 0.0, 0.0, 1.0]));
        assert!(like >= n.threshold(0.2), "{like} vs {}", n.threshold(0.2));
        assert!(
            unlike < n.threshold(0.01),
            "{unlike} vs {}",
            n.threshold(0.01)
        );
        assert_eq!(n.threshold(0.0), f32::NEG_INFINITY, "0 never rejects");
        // Quantiles order the thresholds.
        assert!(n.threshold(0.1) <= n.threshold(0.5));
    }

    #[test]
    fn a_label_with_one_example_is_compared_with_the_other_labels_only() {
        let mut hidden = vec![unit(&[1.0, 0.0])];
        let mut lexical = vec![unit(&[1.0, 0.0])];
        let mut ys = vec![0];
        for i in 0..MIN_EXAMPLES {
            hidden.push(unit(&[0.1 * i as f32, 1.0]));
            lexical.push(unit(&[0.0, 1.0 + i as f32]));
            ys.push(1);
        }
        let n = Novelty::fit(&refs(&hidden), &refs(&lexical), &ys).unwrap();
        assert!(n.left_out.iter().all(|s| s.is_finite()));
        let few = MIN_EXAMPLES - 1;
        let (hidden, lexical) = (refs(&hidden[..few]), refs(&lexical[..few]));
        assert!(Novelty::fit(&hidden, &lexical, &ys[..few]).is_none());
    }

    #[test]
    fn the_threshold_is_the_quantile_of_the_left_out_scores() {
        let n = Novelty {
            centroids: Vec::new(),
            lexical: Vec::new(),
            scale: [(0.0, 1.0); 2],
            left_out: (0..101).map(|i| i as f32).collect(),
        };
        assert_eq!(n.threshold(0.01), 1.0);
        assert_eq!(n.threshold(0.05), 5.0);
        assert_eq!(n.threshold(1.0), 100.0);
        assert_eq!(n.threshold(0.0), f32::NEG_INFINITY);
        assert_eq!(n.threshold(f32::NAN), f32::NEG_INFINITY);
        let back: Novelty = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back.left_out, n.left_out);
    }

    #[test]
    fn sparse_dot_matches_dense() {
        let a = [0.0, 1.0, 0.0, 2.0, 3.0];
        let b = [1.0, 1.0, 0.0, 0.0, 2.0];
        assert_eq!(sparse_dot(&sparse(&a), &sparse(&b)), dot(&a, &b));
    }
}
