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
    let each_alone: Vec<usize> = (0..labels.len()).collect();
    grouped_folds(labels, &each_alone, k, seed)
}

/// As [`stratified_folds`], but whole groups are dealt: rows of one group
/// (`groups[row]`, say a paraphrase cluster) always share a fold, so a
/// fold's rows are tested on a head that saw none of their group.
///
/// # Panics
/// If `k < 2`.
pub fn grouped_folds(labels: &[String], groups: &[usize], k: usize, seed: u64) -> Vec<usize> {
    assert!(k >= 2, "grouped_folds: k must be at least 2, got {k}");
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (row, label) in labels.iter().enumerate() {
        let of_label = by_label.entry(label.as_str()).or_default();
        if !of_label.contains(&groups[row]) {
            of_label.push(groups[row]);
        }
    }
    let mut rng = SplitMix64(seed);
    let mut fold_of_group = BTreeMap::new();
    let mut next_fold = 0;
    for label_groups in by_label.values_mut() {
        for i in (1..label_groups.len()).rev() {
            let j = rng.below(i + 1);
            label_groups.swap(i, j);
        }
        for &g in label_groups.iter() {
            fold_of_group.insert(g, next_fold);
            next_fold = (next_fold + 1) % k;
        }
    }
    groups.iter().map(|g| fold_of_group[g]).collect()
}

/// Paraphrase clusters: rows of one label whose word sets overlap by at
/// least half (Jaccard, lowercased words) are joined, transitively. A label
/// whose rows all fall in one cluster keeps each row alone, so holding out
/// a cluster never removes a label from training. Returns a group id per
/// row.
pub fn paraphrase_groups(texts: &[String], labels: &[String]) -> Vec<usize> {
    let words: Vec<std::collections::BTreeSet<String>> = texts
        .iter()
        .map(|t| {
            t.to_lowercase()
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let mut parent: Vec<usize> = (0..texts.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            if labels[i] != labels[j] {
                continue;
            }
            let common = words[i].intersection(&words[j]).count();
            let all = words[i].union(&words[j]).count();
            if all > 0 && 2 * common >= all {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a] = b;
            }
        }
    }
    let mut groups: Vec<usize> = (0..texts.len()).map(|i| root(&mut parent, i)).collect();
    let mut per_label: BTreeMap<&str, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for (label, &g) in labels.iter().zip(&groups) {
        per_label.entry(label.as_str()).or_default().insert(g);
    }
    for (row, label) in labels.iter().enumerate() {
        if per_label[label.as_str()].len() < 2 {
            groups[row] = row;
        }
    }
    groups
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
    fn a_paraphrase_cluster_stays_in_one_fold_and_no_label_loses_all_its_rows() {
        let rows = [
            ("turn on the lights", "on"),
            ("turn the lights on", "on"),
            ("the lights on", "on"),
            ("illuminate the room", "on"),
            ("make it bright in here", "on"),
            ("switch off the lamp", "off"),
            ("switch the lamp off", "off"),
            ("kill the lights", "off"),
            ("make coffee", "coffee"),
            ("make me a coffee", "coffee"),
        ];
        let texts: Vec<String> = rows.iter().map(|r| r.0.to_owned()).collect();
        let labels: Vec<String> = rows.iter().map(|r| r.1.to_owned()).collect();
        let g = paraphrase_groups(&texts, &labels);
        assert_eq!(g[0], g[1], "word-order paraphrases join");
        assert_eq!(g[1], g[2], "transitively");
        assert_ne!(g[0], g[3]);
        assert_eq!(g[5], g[6]);
        assert_ne!(g[5], g[7]);
        // "coffee" has one cluster only: its rows stay apart.
        assert_ne!(g[8], g[9]);
        let folds = grouped_folds(&labels, &g, 2, 5);
        assert_eq!(folds[0], folds[1]);
        assert_eq!(folds[1], folds[2]);
        assert_eq!(folds[5], folds[6]);
    }

    #[test]
    fn grouped_folds_of_single_rows_are_the_stratified_ones() {
        let labels = sample();
        let alone: Vec<usize> = (0..labels.len()).collect();
        assert_eq!(
            grouped_folds(&labels, &alone, 5, 9),
            stratified_folds(&labels, 5, 9)
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
