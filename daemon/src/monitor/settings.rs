//! The `[tasks.monitor]` table of a `kind = "monitor"` task, and its checks.

use std::collections::BTreeMap;

use serde::Deserialize;

/// How readings are read and judged. Every field has a default except the
/// detectors, which must be named.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// JSON pointer (RFC 6901) of the sensor name in a reading.
    #[serde(default = "default_sensor_pointer")]
    pub sensor_pointer: String,
    /// JSON pointer of the measured value (a number, or a string holding one).
    #[serde(default = "default_value_pointer")]
    pub value_pointer: String,
    /// JSON pointer of the unit; optional in the reading.
    #[serde(default = "default_unit_pointer")]
    pub unit_pointer: String,
    /// JSON pointer of the time stamp (seconds since the epoch, or
    /// `YYYY-MM-DD HH:MM:SS[.fff]` / RFC 3339 in UTC). A reading without
    /// one is stamped with its arrival time.
    #[serde(default = "default_ts_pointer")]
    pub ts_pointer: String,
    /// Readings kept per sensor for the rolling statistics.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Readings needed before the z-score and EWMA detectors judge (before
    /// that the statistics are noise).
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    /// Floor of the standard deviation: on a very steady signal a tiny
    /// wobble would otherwise be many sigma.
    #[serde(default)]
    pub min_std: f64,
    /// Unit used when a reading has none.
    pub unit: Option<String>,
    /// Checked in this order; the first that fires is the note's detector.
    #[serde(default)]
    pub detectors: Vec<DetectorConfig>,
    /// Repeated anomalies of one sensor within this many seconds (of the
    /// readings' time stamps) after a note are counted, not published; the
    /// next note carries the count.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: f64,
    /// Sensors tracked at once; a reading of a further sensor is refused
    /// (memory stays bounded whatever arrives).
    #[serde(default = "default_max_sensors")]
    pub max_sensors: usize,
    /// Per-sensor overrides, by sensor name: any field given replaces the
    /// task's.
    #[serde(default)]
    pub sensors: BTreeMap<String, SensorOverride>,
}

/// The settings one sensor runs with (the task's, with its override).
#[derive(Debug, Clone, PartialEq)]
pub struct SensorSettings {
    pub window: usize,
    pub min_samples: usize,
    pub min_std: f64,
    pub unit: Option<String>,
    pub detectors: Vec<DetectorConfig>,
}

/// A sensor's override: only what is given replaces the task's setting.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorOverride {
    pub window: Option<usize>,
    pub min_samples: Option<usize>,
    pub min_std: Option<f64>,
    pub unit: Option<String>,
    pub detectors: Option<Vec<DetectorConfig>>,
}

/// One detector and its parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectorConfig {
    /// Fixed limits: the value must stay within `min..=max`.
    Threshold { min: Option<f64>, max: Option<f64> },
    /// Change between consecutive readings, in units per second.
    Rate { max_per_sec: f64 },
    /// Distance from the rolling window's mean in window standard deviations.
    Zscore { k: f64 },
    /// Distance from an exponentially weighted mean in its weighted
    /// standard deviations; `alpha` is the weight of the newest reading.
    Ewma { alpha: f64, k: f64 },
}

impl MonitorConfig {
    /// The effective settings of one sensor.
    pub fn for_sensor(&self, sensor: &str) -> SensorSettings {
        let mut s = self.base();
        if let Some(o) = self.sensors.get(sensor) {
            s.window = o.window.unwrap_or(s.window);
            s.min_samples = o.min_samples.unwrap_or(s.min_samples);
            s.min_std = o.min_std.unwrap_or(s.min_std);
            if o.unit.is_some() {
                s.unit = o.unit.clone();
            }
            if let Some(d) = &o.detectors {
                s.detectors = d.clone();
            }
        }
        s
    }

    /// The task's own settings (of every sensor without an override).
    pub fn base(&self) -> SensorSettings {
        SensorSettings {
            window: self.window,
            min_samples: self.min_samples,
            min_std: self.min_std,
            unit: self.unit.clone(),
            detectors: self.detectors.clone(),
        }
    }

    /// Every problem, as (key below `key`, message).
    pub fn problems(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (field, ptr) in [
            ("sensor_pointer", &self.sensor_pointer),
            ("value_pointer", &self.value_pointer),
            ("unit_pointer", &self.unit_pointer),
            ("ts_pointer", &self.ts_pointer),
        ] {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                p.push((
                    format!("{key}.{field}"),
                    format!("{ptr:?} is not a JSON pointer (it must start with '/')"),
                ));
            }
        }
        if !(self.cooldown_secs.is_finite() && self.cooldown_secs >= 0.0) {
            p.push((format!("{key}.cooldown_secs"), "must be 0 or more".into()));
        }
        if self.max_sensors == 0 {
            p.push((format!("{key}.max_sensors"), "must be at least 1".into()));
        }
        // The task's settings apply to every sensor without an override.
        let own = check_sensor(&self.base());
        for (k, m) in &own {
            p.push((format!("{key}{k}"), m.clone()));
        }
        for name in self.sensors.keys() {
            let k = format!("{key}.sensors.{name}");
            if name.trim().is_empty() {
                p.push((k.clone(), "sensor name must not be empty".into()));
            }
            // What the override inherits is reported once, above.
            for (sub, m) in check_sensor(&self.for_sensor(name)) {
                if !own.iter().any(|(o, om)| o == &sub && om == &m) {
                    p.push((format!("{k}{sub}"), m));
                }
            }
        }
        p
    }
}

/// Problems of one sensor's settings, keys relative (`.window`).
fn check_sensor(s: &SensorSettings) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if !(2..=100_000).contains(&s.window) {
        p.push((".window".to_string(), "must be between 2 and 100000".into()));
    }
    if s.min_samples < 2 || s.min_samples > s.window {
        p.push((
            ".min_samples".to_string(),
            format!("must be between 2 and the window ({})", s.window),
        ));
    }
    if !(s.min_std.is_finite() && s.min_std >= 0.0) {
        p.push((".min_std".to_string(), "must be 0 or more".into()));
    }
    if s.detectors.is_empty() {
        p.push((
            ".detectors".to_string(),
            "at least one detector is needed".into(),
        ));
    }
    for (i, d) in s.detectors.iter().enumerate() {
        let k = format!(".detectors[{i}]");
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match *d {
            DetectorConfig::Threshold { min, max } => match (min, max) {
                (None, None) => p.push((k, "a threshold needs min, max or both".into())),
                (Some(lo), Some(hi)) if lo >= hi || lo.is_nan() || hi.is_nan() => {
                    p.push((k, format!("min ({lo}) must be below max ({hi})")))
                }
                _ => {}
            },
            DetectorConfig::Rate { max_per_sec } if !positive(max_per_sec) => {
                p.push((format!("{k}.max_per_sec"), "must be above 0".into()))
            }
            DetectorConfig::Zscore { k: z } if !positive(z) => {
                p.push((format!("{k}.k"), "must be above 0".into()))
            }
            DetectorConfig::Ewma { alpha, k: z } => {
                if !(alpha > 0.0 && alpha <= 1.0) {
                    p.push((format!("{k}.alpha"), "must be in (0, 1]".into()));
                }
                if !positive(z) {
                    p.push((format!("{k}.k"), "must be above 0".into()));
                }
            }
            _ => {}
        }
    }
    p
}

fn default_sensor_pointer() -> String {
    "/sensor".into()
}
fn default_value_pointer() -> String {
    "/value".into()
}
fn default_unit_pointer() -> String {
    "/unit".into()
}
fn default_ts_pointer() -> String {
    "/ts".into()
}
fn default_cooldown() -> f64 {
    300.0
}
fn default_max_sensors() -> usize {
    256
}
fn default_window() -> usize {
    60
}
fn default_min_samples() -> usize {
    20
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MonitorConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(
            r#"
            detectors = [{ kind = "zscore", k = 4.0 }, { kind = "threshold", max = 90.0 }]
            [sensors.vib]
            window = 30
            unit = "mm/s"
            detectors = [{ kind = "rate", max_per_sec = 2.0 }]
            "#,
        )
        .unwrap();
        assert_eq!(c.value_pointer, "/value");
        assert_eq!(c.cooldown_secs, 300.0);
        assert_eq!(c.for_sensor("temp").window, 60);
        let vib = c.for_sensor("vib");
        assert_eq!(vib.window, 30);
        assert_eq!(vib.min_samples, 20);
        assert_eq!(vib.unit.as_deref(), Some("mm/s"));
        assert_eq!(
            vib.detectors,
            vec![DetectorConfig::Rate { max_per_sec: 2.0 }]
        );
        assert!(c.problems("m").is_empty(), "{:?}", c.problems("m"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(parse("windw = 3\ndetectors = []").is_err());
        assert!(parse(r#"detectors = [{ kind = "zscore", k = 3.0, kk = 1 }]"#).is_err());
        assert!(parse(r#"detectors = [{ kind = "median" }]"#).is_err());
    }

    #[test]
    fn every_problem_has_its_key() {
        let c = parse(
            r#"
            value_pointer = "value"
            window = 1
            cooldown_secs = -1.0
            detectors = [{ kind = "threshold" }, { kind = "ewma", alpha = 1.5, k = 0.0 }]
            [sensors.x]
            detectors = []
            "#,
        )
        .unwrap();
        let keys: Vec<String> = c.problems("t").into_iter().map(|(k, _)| k).collect();
        for want in [
            "t.value_pointer",
            "t.cooldown_secs",
            "t.window",
            "t.min_samples",
            "t.detectors[0]",
            "t.detectors[1].alpha",
            "t.detectors[1].k",
            "t.sensors.x.detectors",
        ] {
            assert!(
                keys.iter().any(|k| k == want),
                "{want} missing from {keys:?}"
            );
        }
    }
}
