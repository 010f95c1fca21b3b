//! Detectors: pure judgements of one reading against what came before.
//!
//! Each detector is a function of the reading and a reference (limits, the
//! previous reading, the window's statistics, an EWMA state) returning a
//! [`Firing`] with the numbers it used; [`SensorDetector`] keeps one
//! sensor's references and runs the configured detectors in order.

use super::settings::{DetectorConfig, SensorSettings};
use super::window::{Stats, Window};

/// One reading of one sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the epoch.
    pub ts: f64,
    pub value: f64,
}

/// A detector's verdict "anomalous", with the numbers it compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub detector: &'static str,
    /// What the value was compared with: the window or EWMA mean, the
    /// previous reading (rate); for a threshold the window mean if any.
    pub baseline: Option<f64>,
    /// |value - baseline| in standard deviations (z-score, EWMA).
    pub sigma: Option<f64>,
    /// The limit crossed: the threshold, the rate limit, or k.
    pub limit: Option<f64>,
    /// Units per second between the previous reading and this one (rate).
    pub rate_per_s: Option<f64>,
}

/// Fires when `value` is below `min` or above `max`.
pub fn threshold(
    value: f64,
    min: Option<f64>,
    max: Option<f64>,
    baseline: Option<f64>,
) -> Option<Firing> {
    let crossed = match (min, max) {
        (_, Some(hi)) if value > hi => hi,
        (Some(lo), _) if value < lo => lo,
        _ => return None,
    };
    Some(Firing {
        detector: "threshold",
        baseline,
        sigma: None,
        limit: Some(crossed),
        rate_per_s: None,
    })
}

/// Fires when the change from `prev` to `cur` is faster than `max_per_sec`
/// (either way). Readings with the same time stamp are not judged.
pub fn rate(prev: Sample, cur: Sample, max_per_sec: f64) -> Option<Firing> {
    let dt = cur.ts - prev.ts;
    if dt <= 0.0 {
        return None;
    }
    let r = (cur.value - prev.value) / dt;
    (r.abs() > max_per_sec).then_some(Firing {
        detector: "rate",
        baseline: Some(prev.value),
        sigma: None,
        limit: Some(max_per_sec),
        rate_per_s: Some(r),
    })
}

/// A spread this small next to the mean is rounding noise of a constant
/// signal, not a spread: dividing by it gives absurd sigmas.
fn negligible(std: f64, mean: f64) -> bool {
    std <= 1e-9 * mean.abs().max(1.0)
}

/// Fires when `value` is more than `k` standard deviations (at least
/// `min_std`) from the reference mean. A zero (or negligible) spread never
/// fires: set `min_std` for signals that may sit still.
pub fn zscore(value: f64, reference: Stats, k: f64, min_std: f64) -> Option<Firing> {
    beyond_k(
        "zscore",
        value,
        reference.mean,
        reference.std.max(min_std),
        k,
    )
}

/// `detector` fires when `value` is more than `k` times `std` from `mean`.
fn beyond_k(detector: &'static str, value: f64, mean: f64, std: f64, k: f64) -> Option<Firing> {
    if negligible(std, mean) {
        return None;
    }
    let z = (value - mean).abs() / std;
    (z > k).then_some(Firing {
        detector,
        baseline: Some(mean),
        sigma: Some(z),
        limit: Some(k),
        rate_per_s: None,
    })
}

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    pub mean: f64,
    pub var: f64,
    /// Readings learnt so far (it judges from `min_samples` on).
    pub n: usize,
}

impl Ewma {
    pub fn start(value: f64) -> Ewma {
        Ewma {
            mean: value,
            var: 0.0,
            n: 1,
        }
    }

    /// Learns a reading (West's incremental form).
    pub fn learn(&mut self, value: f64, alpha: f64) {
        let d = value - self.mean;
        self.mean += alpha * d;
        self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        self.n += 1;
    }

    /// Fires when `value` is more than `k` weighted deviations away.
    pub fn judge(&self, value: f64, k: f64, min_std: f64) -> Option<Firing> {
        beyond_k("ewma", value, self.mean, self.var.sqrt().max(min_std), k)
    }
}

/// One sensor's references and its detectors.
///
/// A reading that some detector calls anomalous is not learnt into the
/// window or the EWMA, so the baseline of an excursion stays the normal one
/// (its notes say how far from normal it is) -- until `min_samples`
/// anomalous readings in a row: from then on they are learnt, and a lasting
/// change of level becomes the new normal within about a window (otherwise
/// a sensor whose EWMA had followed a slow drift would never be normal
/// again). The previous reading (for the rate) is always the last one.
#[derive(Debug, Clone)]
pub struct SensorDetector {
    settings: SensorSettings,
    window: Window,
    /// Per detector (same index): its EWMA state, for `ewma` detectors.
    ewma: Vec<Option<Ewma>>,
    prev: Option<Sample>,
    /// Statistics known before the first reading (`prime`); used while the
    /// window has fewer than `min_samples` readings.
    prior: Option<Stats>,
    /// Anomalous readings in a row, up to this one.
    anomalous_run: usize,
}

impl SensorDetector {
    pub fn new(settings: SensorSettings) -> SensorDetector {
        SensorDetector {
            window: Window::new(settings.window),
            ewma: vec![None; settings.detectors.len()],
            prev: None,
            prior: None,
            anomalous_run: 0,
            settings,
        }
    }

    pub fn settings(&self) -> &SensorSettings {
        &self.settings
    }

    /// Starts from known statistics (mean, std) of the readings before
    /// the first one given (the evaluation's preceding baseline).
    pub fn prime(&mut self, mean: f64, std: f64) {
        let min = self.settings.min_samples;
        self.prior = Some(Stats { mean, std, n: min });
        for (state, d) in self.ewma.iter_mut().zip(&self.settings.detectors) {
            if let DetectorConfig::Ewma { .. } = d {
                *state = Some(Ewma {
                    mean,
                    var: std * std,
                    n: min,
                });
            }
        }
    }

    /// The reference statistics, from the window's `stats`: the window once
    /// it has `min_samples` readings, else the prior if any.
    fn reference(&self, stats: Option<Stats>) -> Option<Stats> {
        match stats {
            Some(s) if s.n >= self.settings.min_samples => Some(s),
            _ => self.prior,
        }
    }

    /// Judges `s` by every detector (in the configured order), then learns
    /// it unless one fired (and the run of anomalies is still short).
    /// Returns the firings, empty when normal.
    pub fn step(&mut self, s: Sample) -> Vec<Firing> {
        let stats = self.window.stats();
        let reference = self.reference(stats);
        let min_std = self.settings.min_std;
        let min_samples = self.settings.min_samples;
        let mut fired = Vec::new();
        for (i, d) in self.settings.detectors.iter().enumerate() {
            let f = match *d {
                DetectorConfig::Threshold { min, max } => {
                    let base = stats.map(|w| w.mean);
                    threshold(s.value, min, max, base)
                }
                DetectorConfig::Rate { max_per_sec } => {
                    self.prev.and_then(|p| rate(p, s, max_per_sec))
                }
                DetectorConfig::Zscore { k } => {
                    reference.and_then(|r| zscore(s.value, r, k, min_std))
                }
                DetectorConfig::Ewma { k, .. } => self.ewma[i]
                    .filter(|e| e.n >= min_samples)
                    .and_then(|e| e.judge(s.value, k, min_std)),
            };
            fired.extend(f);
        }
        self.prev = Some(s);
        self.anomalous_run = if fired.is_empty() {
            0
        } else {
            self.anomalous_run + 1
        };
        if self.anomalous_run == 0 || self.anomalous_run > min_samples {
            self.window.push(s.value);
            for (state, d) in self.ewma.iter_mut().zip(&self.settings.detectors) {
                if let DetectorConfig::Ewma { alpha, .. } = *d {
                    match state {
                        Some(e) => e.learn(s.value, alpha),
                        None => *state = Some(Ewma::start(s.value)),
                    }
                }
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: f64, value: f64) -> Sample {
        Sample { ts, value }
    }

    #[test]
    fn threshold_fires_outside_the_limits_only() {
        assert!(threshold(50.0, Some(10.0), Some(90.0), None).is_none());
        assert!(threshold(90.0, Some(10.0), Some(90.0), None).is_none());
        let f = threshold(91.0, Some(10.0), Some(90.0), Some(60.0)).unwrap();
        assert_eq!((f.limit, f.baseline), (Some(90.0), Some(60.0)));
        assert_eq!(
            threshold(9.0, Some(10.0), None, None).unwrap().limit,
            Some(10.0)
        );
        assert!(threshold(1e9, Some(10.0), None, None).is_none());
    }

    #[test]
    fn rate_is_per_second_and_either_way() {
        assert!(rate(at(0.0, 10.0), at(10.0, 14.0), 0.5).is_none());
        let f = rate(at(0.0, 10.0), at(2.0, 4.0), 0.5).unwrap();
        assert_eq!(f.rate_per_s, Some(-3.0));
        assert_eq!(f.baseline, Some(10.0));
        assert!(
            rate(at(5.0, 10.0), at(5.0, 99.0), 0.5).is_none(),
            "same time stamp"
        );
    }

    #[test]
    fn zscore_uses_the_floor_and_ignores_flat_references() {
        let r = Stats {
            mean: 10.0,
            std: 2.0,
            n: 20,
        };
        assert!(zscore(15.0, r, 3.0, 0.0).is_none());
        let f = zscore(17.0, r, 3.0, 0.0).unwrap();
        assert_eq!(f.sigma, Some(3.5));
        assert!(
            zscore(17.0, r, 3.0, 4.0).is_none(),
            "min_std 4 makes it 1.75 sigma"
        );
        let flat = Stats { std: 0.0, ..r };
        assert!(zscore(11.0, flat, 3.0, 0.0).is_none());
        let rounding_noise = Stats { std: 5e-14, ..r };
        assert!(zscore(11.0, rounding_noise, 3.0, 0.0).is_none());
        assert!(zscore(11.0, flat, 3.0, 0.1).is_some());
    }

    #[test]
    fn ewma_tracks_and_judges() {
        let mut e = Ewma::start(10.0);
        for v in [12.0, 8.0, 11.0, 9.0, 10.0, 12.0, 8.0] {
            e.learn(v, 0.3);
        }
        assert!((e.mean - 10.0).abs() < 1.5);
        assert!(e.var > 0.5);
        assert!(e.judge(e.mean + 0.5, 3.0, 0.0).is_none());
        let f = e.judge(e.mean + 20.0, 3.0, 0.0).unwrap();
        assert!(f.sigma.unwrap() > 3.0);
    }

    fn settings(detectors: Vec<DetectorConfig>) -> SensorSettings {
        SensorSettings {
            window: 10,
            min_samples: 5,
            min_std: 0.0,
            unit: None,
            detectors,
        }
    }

    #[test]
    fn sensor_waits_for_min_samples_and_does_not_learn_anomalies() {
        let mut d = SensorDetector::new(settings(vec![DetectorConfig::Zscore { k: 3.0 }]));
        for (i, v) in [10.0, 11.0, 9.0, 10.0].into_iter().enumerate() {
            assert!(d.step(at(i as f64, v)).is_empty());
        }
        // Fifth reading: only four in the window, not judged yet.
        assert!(d.step(at(4.0, 100.0)).is_empty());
        // That 100 was learnt (nothing judged it); now five readings.
        let mut d = SensorDetector::new(settings(vec![DetectorConfig::Zscore { k: 3.0 }]));
        for (i, v) in [10.0, 11.0, 9.0, 10.0, 10.5].into_iter().enumerate() {
            d.step(at(i as f64, v));
        }
        let f = d.step(at(5.0, 30.0));
        assert_eq!(f.len(), 1);
        let base = f[0].baseline.unwrap();
        // The excursion is not learnt: the next one is judged against the same baseline.
        let g = d.step(at(6.0, 30.0));
        assert_eq!(g[0].baseline, Some(base));
    }

    #[test]
    fn a_lasting_change_becomes_the_new_normal() {
        let mut d = SensorDetector::new(settings(vec![DetectorConfig::Zscore { k: 3.0 }]));
        for i in 0..10 {
            d.step(at(i as f64, 10.0 + (i % 2) as f64));
        }
        // A new level: anomalous for min_samples (5) readings without being
        // learnt, then learnt until the window holds mostly the new level.
        let mut fired = 0;
        for i in 10..40 {
            if !d.step(at(i as f64, 50.0 + (i % 2) as f64)).is_empty() {
                fired += 1;
            }
        }
        assert!((5..15).contains(&fired), "{fired}");
        assert!(d.step(at(40.0, 50.5)).is_empty());
    }

    #[test]
    fn every_firing_detector_is_reported_in_order() {
        let mut d = SensorDetector::new(settings(vec![
            DetectorConfig::Threshold {
                min: None,
                max: Some(50.0),
            },
            DetectorConfig::Rate { max_per_sec: 1.0 },
            DetectorConfig::Ewma { alpha: 0.2, k: 4.0 },
        ]));
        for i in 0..10 {
            assert!(d.step(at(i as f64, 20.0 + (i % 2) as f64)).is_empty());
        }
        let f = d.step(at(10.0, 60.0));
        let names: Vec<_> = f.iter().map(|f| f.detector).collect();
        assert_eq!(names, ["threshold", "rate", "ewma"]);
    }

    #[test]
    fn a_prime_judges_from_the_first_reading() {
        let mut d = SensorDetector::new(settings(vec![DetectorConfig::Zscore { k: 3.0 }]));
        d.prime(10.0, 1.0);
        assert_eq!(d.step(at(0.0, 14.0))[0].baseline, Some(10.0));
        assert!(d.step(at(1.0, 11.0)).is_empty());
    }
}
