//! A sensor's rolling window: the last N readings and their statistics.

use std::collections::VecDeque;

/// Mean and (sample) standard deviation of a set of readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

/// The last `capacity` readings of one sensor. Statistics are recomputed
/// from the values on demand (exact; windows are small, and running sums
/// would drift over months of readings).
#[derive(Debug, Clone)]
pub struct Window {
    values: VecDeque<f64>,
    capacity: usize,
}

impl Window {
    pub fn new(capacity: usize) -> Window {
        Window {
            values: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, v: f64) {
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `None` when empty; the deviation is 0 with one value.
    pub fn stats(&self) -> Option<Stats> {
        let n = self.values.len();
        if n == 0 {
            return None;
        }
        let mean = self.values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            self.values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Stats {
            mean,
            std: var.sqrt(),
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_n_and_their_statistics() {
        let mut w = Window::new(3);
        assert!(w.stats().is_none());
        for v in [100.0, 1.0, 2.0, 3.0] {
            w.push(v);
        }
        assert_eq!(w.len(), 3);
        let s = w.stats().unwrap();
        assert_eq!(s.mean, 2.0);
        assert!((s.std - 1.0).abs() < 1e-12);
        assert_eq!(s.n, 3);
    }

    #[test]
    fn one_value_has_no_spread() {
        let mut w = Window::new(5);
        w.push(7.0);
        assert_eq!(
            w.stats(),
            Some(Stats {
                mean: 7.0,
                std: 0.0,
                n: 1
            })
        );
    }
}
