//! Deterministic stratified k-fold assignment for cross-validation.

use std::collections::BTreeMap;

/// Minimal splitmix64 generator: small, fast and fully deterministic, which
/// is all a reproducible shuffle needs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough index in `0..bound` (`bound > 0`); the modulo bias is
    /// negligible for data-set sized bounds.
    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// Assigns every row a fold index in `0..k`, stratified by label.
///
/// Labels are visited in sorted order; the rows of each label are shuffled
/// (Fisher–Yates driven by splitmix64 seeded with `seed`) and dealt
/// round-robin into the folds. The round-robin position carries over from one
/// label to the next, so overall fold sizes differ by at most one, and so do
/// the per-fold counts of any single label. The result depends only on
/// `labels`, `k` and `seed`.
///
/// # Panics
/// If `k < 2` (a single fold leaves nothing to train on).
pub fn stratified_folds(labels: &[String], k: usize, seed: u64) -> Vec<usize> {
    assert!(k >= 2, "stratified_folds: k must be at least 2, got {k}");

    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (row, label) in labels.iter().enumerate() {
        by_label.entry(label.as_str()).or_default().push(row);
    }

    let mut rng = SplitMix64(seed);
    let mut folds = vec![0; labels.len()];
    let mut next_fold = 0;
    for rows in by_label.values_mut() {
        for i in (1..rows.len()).rev() {
            let j = rng.below(i + 1);
            rows.swap(i, j);
        }
        for &row in rows.iter() {
            folds[row] = next_fold;
            next_fold = (next_fold + 1) % k;
        }
    }
    folds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 labels of uneven sizes (17, 9, 4 rows), interleaved.
    fn sample() -> Vec<String> {
        let mut labels = Vec::new();
        for i in 0..17 {
            labels.push("alpha".to_string());
            if i < 9 {
                labels.push("beta".to_string());
            }
            if i < 4 {
                labels.push("gamma".to_string());
            }
        }
        labels
    }

    fn spread(counts: &[usize]) -> usize {
        counts.iter().max().unwrap() - counts.iter().min().unwrap()
    }

    #[test]
    fn every_row_gets_a_valid_fold() {
        let labels = sample();
        for k in 2..=7 {
            let folds = stratified_folds(&labels, k, 42);
            assert_eq!(folds.len(), labels.len());
            assert!(folds.iter().all(|&f| f < k));
        }
    }

    #[test]
    fn fold_sizes_are_balanced() {
        let labels = sample();
        for k in 2..=7 {
            let folds = stratified_folds(&labels, k, 7);
            let mut sizes = vec![0; k];
            for &f in &folds {
                sizes[f] += 1;
            }
            assert!(spread(&sizes) <= 1, "k={k} sizes={sizes:?}");
        }
    }

    #[test]
    fn each_label_is_spread_across_folds() {
        let labels = sample();
        for k in 2..=7 {
            let folds = stratified_folds(&labels, k, 3);
            for name in ["alpha", "beta", "gamma"] {
                let mut counts = vec![0; k];
                for (label, &f) in labels.iter().zip(&folds) {
                    if label == name {
                        counts[f] += 1;
                    }
                }
                assert!(spread(&counts) <= 1, "k={k} {name}: {counts:?}");
            }
        }
    }

    #[test]
    fn same_seed_same_result_different_seed_different_result() {
        let labels = sample();
        assert_eq!(
            stratified_folds(&labels, 5, 11),
            stratified_folds(&labels, 5, 11)
        );
        assert_ne!(
            stratified_folds(&labels, 5, 11),
            stratified_folds(&labels, 5, 12)
        );
    }

    #[test]
    fn empty_input_gives_empty_output() {
        assert!(stratified_folds(&[], 5, 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "k must be at least 2")]
    fn k_below_two_panics() {
        stratified_folds(&sample(), 1, 0);
    }
}
