//! A multinomial logistic-regression head over the model's pooled hidden
//! states: trained on the device in well under a second from a task's
//! labelled examples, it turns an embedding into a probability per label.
//!
//! Features are L2-normalised, then centred on the training mean; the loss is
//! mean cross-entropy plus a weak L2 penalty (`1 / (2 C n) * |W|^2`, as
//! scikit-learn's `C`). Full-batch Adam converges on a few hundred examples in
//! a few hundred steps. Training skips the zeros of the n-gram columns
//! ([`Samples`]): a quarter of the work of treating them as dense.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Head {
    pub labels: Vec<String>,
    dim: usize,
    mean: Vec<f32>,
    /// Row-major `labels.len() x dim`.
    weights: Vec<f32>,
    bias: Vec<f32>,
    /// Softmax temperature; 1.0 until calibrated.
    pub temperature: f32,
    /// The token centre its features were pooled around
    /// ([`super::embed::pool`]); requests are pooled the same way.
    #[serde(default)]
    pub token_centre: Vec<f32>,
    /// How unlike the examples an input is ([`super::novelty`]).
    #[serde(default)]
    pub novelty: Option<super::novelty::Novelty>,
}

/// Training settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// Inverse regularisation strength (larger is weaker).
    pub c: f32,
    pub steps: usize,
    pub learning_rate: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            c: 1000.0,
            steps: 400,
            learning_rate: 0.05,
        }
    }
}

pub fn l2_normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

impl Head {
    /// Trains on `(embedding, label index)` pairs. Embeddings must all have
    /// the same length and already be L2-normalised.
    pub fn train(labels: Vec<String>, xs: &[Vec<f32>], ys: &[usize], opt: TrainOptions) -> Head {
        let k = labels.len();
        let set = Samples::new(xs);
        let n = xs.len().max(1) as f32;
        let mut w = Weights::new(k, &set);
        let mut bias = vec![0.0f32; k];
        let mut adam_w = Adam::new(w.flat.len());
        let mut adam_b = Adam::new(k);
        let l2 = 1.0 / (opt.c * n);
        let mut grad = Weights::new(k, &set);
        let mut grad_b = vec![0.0f32; k];
        let d = set.width;
        let (mut shift, mut logits, mut err) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        for step in 1..=opt.steps {
            grad.flat.iter_mut().for_each(|g| *g = 0.0);
            grad_b.iter_mut().for_each(|g| *g = 0.0);
            // W.(x - mean) = W.x - W.mean: the centred features are never
            // formed, so the zeros of the sparse columns cost nothing.
            w.times(set.mean_dense(), set.mean_sparse(), &mut shift);
            for (i, (sparse, &y)) in set.sparse.iter().zip(ys).enumerate() {
                let dense = &set.dense[i * d..(i + 1) * d];
                w.times(dense, sparse.iter().copied(), &mut logits);
                for ((l, b), s) in logits.iter_mut().zip(&bias).zip(&shift) {
                    *l += b - s;
                }
                for (c, (e, p)) in err.iter_mut().zip(softmax(&logits, 1.0)).enumerate() {
                    *e = (p - if c == y { 1.0 } else { 0.0 }) / n;
                }
                grad.add_outer(&err, dense, sparse.iter().copied());
                grad_b.iter_mut().zip(&err).for_each(|(g, e)| *g += e);
            }
            // The gradient of the centred features is sum(err x) - sum(err)
            // mean; then the L2 penalty's.
            let neg_b: Vec<f32> = grad_b.iter().map(|g| -g).collect();
            grad.add_outer(&neg_b, set.mean_dense(), set.mean_sparse());
            grad.flat
                .iter_mut()
                .zip(&w.flat)
                .for_each(|(g, w)| *g += l2 * w);
            adam_w.step(&mut w.flat, &grad.flat, opt.learning_rate, step);
            adam_b.step(&mut bias, &grad_b, opt.learning_rate, step);
        }
        Head {
            labels,
            dim: set.dim,
            weights: w.rows(&set),
            mean: set.mean,
            bias,
            temperature: 1.0,
            token_centre: Vec::new(),
            novelty: None,
        }
    }

    fn logits_centred(&self, x: &[f32]) -> Vec<f32> {
        (0..self.labels.len())
            .map(|c| {
                let row = &self.weights[c * self.dim..(c + 1) * self.dim];
                self.bias[c] + dot(row, x)
            })
            .collect()
    }

    /// Uncalibrated scores per label (same order as `labels`).
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let centred: Vec<f32> = x.iter().zip(&self.mean).map(|(v, m)| v - m).collect();
        self.logits_centred(&centred)
    }

    /// Probability per label (same order as `labels`) for a feature vector.
    pub fn predict(&self, x: &[f32]) -> Vec<f32> {
        softmax(&self.logits(x), self.temperature)
    }

    /// Trains on all examples, then sets the softmax temperature so that
    /// confidences mean what they say: `folds`-fold cross-validation on the
    /// training examples gives held-out scores for every example, and the
    /// temperature that minimises their negative log-likelihood is kept
    /// (temperature scaling; it never changes which label wins).
    /// With fewer than two examples of some label per fold the temperature
    /// stays 1. The `folds + 1` fits run on `threads` threads; `fitted` is
    /// called after each.
    pub fn train_calibrated(
        labels: Vec<String>,
        xs: &[Vec<f32>],
        ys: &[usize],
        opt: TrainOptions,
        folds: usize,
        threads: usize,
        fitted: impl Fn() + Sync,
    ) -> Head {
        let names: Vec<String> = ys.iter().map(|y| y.to_string()).collect();
        let folds = if folds < 2 || xs.len() < 2 * folds {
            0
        } else {
            folds
        };
        let fold_of = match folds {
            0 => vec![0; xs.len()],
            k => slmd_core::folds::stratified_folds(&names, k, 0x5eed),
        };
        // Job 0 trains on everything, job f + 1 without fold f; they are
        // independent, so they run on `threads` threads at once.
        let train = |job: usize| {
            let (x, y): (Vec<Vec<f32>>, Vec<usize>) = xs
                .iter()
                .zip(ys)
                .zip(&fold_of)
                .filter(|(_, &k)| job == 0 || k != job - 1)
                .map(|((x, &y), _)| (x.clone(), y))
                .unzip();
            let head = Head::train(labels.clone(), &x, &y, opt);
            fitted();
            head
        };
        let mut heads = in_parallel(folds + 1, threads, train).into_iter();
        let mut head = heads.next().expect("the whole head");
        if folds == 0 {
            return head;
        }
        let mut held_out = Vec::with_capacity(xs.len());
        for (f, inner) in heads.enumerate() {
            for ((x, &y), _) in xs.iter().zip(ys).zip(&fold_of).filter(|(_, &k)| k == f) {
                held_out.push((inner.logits(x), y));
            }
        }
        head.temperature = fit_temperature(&held_out);
        head
    }
}

/// `f(0..n)`, in order, computed on up to `threads` threads.
fn in_parallel<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let out = f(i);
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, out));
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, out)| out).collect()
}

/// Training features stored for speed. A head's input is a dense hidden
/// state followed by hashed n-gram features that are mostly zero, so a
/// sample keeps its leading columns (those no sample has a zero in) as
/// they are and, of the rest, only its nonzero ones. A column no sample
/// uses keeps a zero weight and is not trained at all.
struct Samples {
    dim: usize,
    /// How many leading columns are dense.
    width: usize,
    /// The dense columns of every sample, row by row.
    dense: Vec<f32>,
    mean: Vec<f32>,
    /// The columns after the dense ones that some sample uses.
    used: Vec<usize>,
    /// Per sample, `(index into used, value)` of its nonzero sparse columns.
    sparse: Vec<Vec<(usize, f32)>>,
}

impl Samples {
    fn new(xs: &[Vec<f32>]) -> Samples {
        let dim = xs.first().map_or(0, Vec::len);
        let n = xs.len().max(1) as f32;
        let mut mean = vec![0.0f32; dim];
        for x in xs {
            mean.iter_mut().zip(x).for_each(|(m, v)| *m += v / n);
        }
        let dense = (0..dim)
            .find(|&j| xs.iter().any(|x| x[j] == 0.0))
            .unwrap_or(dim);
        let used: Vec<usize> = (dense..dim)
            .filter(|&j| xs.iter().any(|x| x[j] != 0.0))
            .collect();
        let sparse = xs
            .iter()
            .map(|x| {
                used.iter()
                    .enumerate()
                    .filter(|&(_, &j)| x[j] != 0.0)
                    .map(|(u, &j)| (u, x[j]))
                    .collect()
            })
            .collect();
        Samples {
            dim,
            width: dense,
            dense: xs.iter().flat_map(|x| &x[..dense]).copied().collect(),
            mean,
            used,
            sparse,
        }
    }

    fn mean_dense(&self) -> &[f32] {
        &self.mean[..self.width]
    }

    /// `(index into used, mean)` of each used sparse column.
    fn mean_sparse(&self) -> impl Iterator<Item = (usize, f32)> + '_ {
        self.used.iter().map(|&j| self.mean[j]).enumerate()
    }
}

/// The weights being trained: the dense columns row by row (one row per
/// label, for dot products along a sample), then the used sparse columns
/// column by column (the `k` weights of one column together, so a sample's
/// nonzero column updates every label's score in one vector operation).
struct Weights {
    k: usize,
    dense: usize,
    flat: Vec<f32>,
}

impl Weights {
    fn new(k: usize, set: &Samples) -> Weights {
        Weights {
            k,
            dense: set.width,
            flat: vec![0.0; k * (set.width + set.used.len())],
        }
    }

    fn split(&self) -> (&[f32], &[f32]) {
        self.flat.split_at(self.k * self.dense)
    }

    /// `out = W x` for the features `dense` and `sparse` (`(used column,
    /// value)`); `out` has a place per label.
    fn times(&self, dense: &[f32], sparse: impl Iterator<Item = (usize, f32)>, out: &mut [f32]) {
        let (rows, columns) = self.split();
        out.iter_mut().for_each(|o| *o = 0.0);
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(self.dense.max(1))) {
            *o = dot(row, dense);
        }
        for (u, v) in sparse {
            let column = &columns[u * self.k..(u + 1) * self.k];
            out.iter_mut().zip(column).for_each(|(o, w)| *o += v * w);
        }
    }

    /// `W += a x^T` for per-label factors `a` and features `x`.
    fn add_outer(&mut self, a: &[f32], dense: &[f32], sparse: impl Iterator<Item = (usize, f32)>) {
        let (k, d) = (self.k, self.dense);
        let (rows, columns) = self.flat.split_at_mut(k * d);
        for (row, a) in rows.chunks_exact_mut(d.max(1)).zip(a) {
            row.iter_mut().zip(dense).for_each(|(r, x)| *r += a * x);
        }
        for (u, v) in sparse {
            let column = &mut columns[u * k..(u + 1) * k];
            column.iter_mut().zip(a).for_each(|(w, a)| *w += a * v);
        }
    }

    /// The head's row-major `k x dim` matrix (unused columns zero).
    fn rows(&self, set: &Samples) -> Vec<f32> {
        let (k, d) = (self.k, self.dense);
        let (rows, columns) = self.split();
        let mut out = vec![0.0f32; k * set.dim];
        for c in 0..k {
            out[c * set.dim..c * set.dim + d].copy_from_slice(&rows[c * d..(c + 1) * d]);
            for (u, &j) in set.used.iter().enumerate() {
                out[c * set.dim + j] = columns[u * k + c];
            }
        }
        out
    }
}

/// The temperature in [0.05, 20] that minimises the mean negative
/// log-likelihood of `(logits, true label)` pairs (log-spaced grid search;
/// the loss is smooth and one-dimensional).
pub fn fit_temperature(samples: &[(Vec<f32>, usize)]) -> f32 {
    if samples.is_empty() {
        return 1.0;
    }
    let nll = |t: f32| -> f32 {
        samples
            .iter()
            .map(|(l, y)| -softmax(l, t)[*y].max(1e-12).ln())
            .sum::<f32>()
    };
    let (lo, hi) = (0.05f32.ln(), 20.0f32.ln());
    (0..=200)
        .map(|i| (lo + (hi - lo) * i as f32 / 200.0).exp())
        .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
        .unwrap_or(1.0)
}

/// Dot product in 32 independent lanes, so the compiler can vectorise it
/// and keep several additions in flight (a single running sum can be
/// neither reordered nor overlapped, and training is mostly this).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut lanes = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, t: usize) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        let c1 = 1.0 - B1.powi(t as i32);
        let c2 = 1.0 - B2.powi(t as i32);
        let moments = self.m.iter_mut().zip(self.v.iter_mut());
        for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(moments) {
            *m = B1 * *m + (1.0 - B1) * g;
            *v = B2 * *v + (1.0 - B2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_jobs_come_back_in_order_whatever_the_threads() {
        for threads in [0, 1, 2, 7] {
            assert_eq!(in_parallel(5, threads, |i| i * 10), [0, 10, 20, 30, 40]);
        }
        assert!(in_parallel(0, 2, |i| i).is_empty());
    }

    #[test]
    fn a_calibrated_head_is_the_same_on_one_thread_or_several() {
        let xs: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let a = (i % 4) as f32;
                let mut x = vec![a, 1.0 - a * 0.2, (i as f32 * 0.37).sin()];
                l2_normalise(&mut x);
                x
            })
            .collect();
        let ys: Vec<usize> = (0..40).map(|i| i % 4).collect();
        let labels: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let fit = |threads| {
            Head::train_calibrated(
                labels.clone(),
                &xs,
                &ys,
                TrainOptions::default(),
                5,
                threads,
                || {},
            )
        };
        let (one, two) = (fit(1), fit(2));
        assert_eq!(one.weights, two.weights);
        assert_eq!(one.temperature, two.temperature);
        assert_ne!(one.temperature, 1.0, "calibrated");
    }

    /// Full-batch gradient descent on explicitly centred features, written
    /// as plainly as possible: what `Head::train` computes faster.
    fn plain_logits(xs: &[Vec<f32>], ys: &[usize], k: usize, steps: usize) -> Vec<Vec<f32>> {
        let (n, dim) = (xs.len() as f32, xs[0].len());
        let mean: Vec<f32> = (0..dim)
            .map(|j| xs.iter().map(|x| x[j]).sum::<f32>() / n)
            .collect();
        let centred: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| x.iter().zip(&mean).map(|(v, m)| v - m).collect())
            .collect();
        let opt = TrainOptions::default();
        let (mut w, mut b) = (vec![vec![0.0f32; dim]; k], vec![0.0f32; k]);
        let (mut adam_w, mut adam_b) = (Adam::new(k * dim), Adam::new(k));
        let logits = |w: &[Vec<f32>], b: &[f32], x: &[f32]| -> Vec<f32> {
            (0..k)
                .map(|c| b[c] + x.iter().zip(&w[c]).map(|(a, b)| a * b).sum::<f32>())
                .collect()
        };
        for step in 1..=steps {
            let mut gw = vec![0.0f32; k * dim];
            let mut gb = vec![0.0f32; k];
            for (x, &y) in centred.iter().zip(ys) {
                let p = softmax(&logits(&w, &b, x), 1.0);
                for c in 0..k {
                    let err = (p[c] - f32::from(c == y)) / n;
                    gb[c] += err;
                    for j in 0..dim {
                        gw[c * dim + j] += err * x[j];
                    }
                }
            }
            for c in 0..k {
                for j in 0..dim {
                    gw[c * dim + j] += w[c][j] / (opt.c * n);
                }
            }
            let mut flat: Vec<f32> = w.concat();
            adam_w.step(&mut flat, &gw, opt.learning_rate, step);
            adam_b.step(&mut b, &gb, opt.learning_rate, step);
            w = flat.chunks(dim).map(<[f32]>::to_vec).collect();
        }
        centred.iter().map(|x| logits(&w, &b, x)).collect()
    }

    #[test]
    fn training_on_sparse_columns_matches_training_on_centred_features() {
        // A dense block, then hashed-n-gram-like columns, mostly zero.
        let (k, n) = (3, 30);
        let xs: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                let mut x: Vec<f32> = (0..8)
                    .map(|j| ((i * 7 + j * 3) as f32).sin() + 1.5)
                    .collect();
                x.extend((0..40).map(|j| if (i + j) % 9 == i % 3 { 0.5 } else { 0.0 }));
                l2_normalise(&mut x);
                x
            })
            .collect();
        let ys: Vec<usize> = (0..n).map(|i| i % k).collect();
        let labels: Vec<String> = (0..k).map(|c| c.to_string()).collect();
        let opt = TrainOptions {
            steps: 50,
            ..TrainOptions::default()
        };
        let head = Head::train(labels, &xs, &ys, opt);
        assert_eq!(Samples::new(&xs).width, 8);
        for (x, want) in xs.iter().zip(plain_logits(&xs, &ys, k, 50)) {
            for (got, want) in head.logits(x).iter().zip(&want) {
                assert!((got - want).abs() < 1e-3, "{got} vs {want}");
            }
        }
    }

    fn point(a: f32, b: f32) -> Vec<f32> {
        let mut v = vec![a, b, 0.1];
        l2_normalise(&mut v);
        v
    }

    #[test]
    fn separates_separable_classes() {
        let xs = vec![
            point(1.0, 0.1),
            point(0.9, 0.2),
            point(0.1, 1.0),
            point(0.2, 0.9),
        ];
        let ys = vec![0, 0, 1, 1];
        let head = Head::train(
            vec!["a".into(), "b".into()],
            &xs,
            &ys,
            TrainOptions::default(),
        );
        let p = head.predict(&point(0.95, 0.1));
        assert!(p[0] > 0.9, "{p:?}");
        let p = head.predict(&point(0.1, 0.95));
        assert!(p[1] > 0.9, "{p:?}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn fitted_temperature_softens_overconfident_scores() {
        // Scores that say 0.99 but are right only 3 times in 4.
        let mut samples = Vec::new();
        for i in 0..40 {
            let y = if i % 4 == 0 { 1 } else { 0 };
            samples.push((vec![4.6, 0.0], y));
        }
        let t = fit_temperature(&samples);
        let p = softmax(&[4.6, 0.0], t)[0];
        assert!((p - 0.75).abs() < 0.03, "t = {t}, p = {p}");
        // Scores that are always right get sharper, not softer.
        let sure: Vec<_> = (0..10).map(|_| (vec![1.0, 0.0], 0)).collect();
        assert!(fit_temperature(&sure) < 1.0);
    }

    #[test]
    fn temperature_softens_without_reordering() {
        let sharp = softmax(&[2.0, 1.0, 0.0], 1.0);
        let soft = softmax(&[2.0, 1.0, 0.0], 3.0);
        assert!(soft[0] < sharp[0]);
        assert!(soft[0] > soft[1] && soft[1] > soft[2]);
    }
}
