//! Factory-line anomaly notes: sensor readings in, a short note out when a
//! detector (never the model) calls a reading anomalous.
//!
//! # Flow
//!
//! A task of `kind = "monitor"` consumes readings, by default
//! `{"sensor": ..., "value": ..., "unit": ..., "ts": ...}` (other layouts
//! through the JSON pointers of `[tasks.monitor]`, [`settings`]). Each
//! sensor has its own [`detect::SensorDetector`]: a rolling window of the
//! last `window` readings and the configured detectors, run in order:
//!
//! - `threshold`: fixed `min` / `max`;
//! - `rate`: change between consecutive readings per second;
//! - `zscore`: distance from the window's mean in window standard
//!   deviations, once `min_samples` readings are in;
//! - `ewma`: distance from an exponentially weighted mean in its weighted
//!   standard deviation (`alpha`, `k`), after the same warm-up.
//!
//! Readings that a detector fires on are not learnt into the window or
//! the EWMA, so the baseline of an excursion stays the normal one; after
//! `min_samples` anomalous readings in a row they are learnt after all, so
//! a lasting change of level (a new set point, or the return from a slow
//! drift the EWMA had followed) becomes the new normal within about a
//! window instead of yielding a note every cooldown for ever.
//!
//! # The note
//!
//! The numbers are the detector's ([`note::Facts`]: value, baseline,
//! deviation, sigma, limit, rate, duration, count), rounded once to four
//! significant digits. The model is asked one thing: which of the task's
//! labels (the cause categories) fits the facts in words
//! ([`note::Facts::describe`]), through the task's ordinary classification
//! head. The operator's sentence is a template over the facts and the
//! chosen label, so it can hold no number that is not a fact;
//! [`note::ungrounded`] checks that.
//!
//! # Cooldown
//!
//! Per sensor, on the readings' own time stamps (so a replay behaves as the
//! live line did): the first anomaly publishes a note at once with
//! `count: 1`. Further anomalies within `cooldown_secs` of that note are
//! counted and not published. The first anomaly after the cooldown has run
//! out publishes the next note, whose `count` is itself plus the anomalies
//! held back (and `first_ts` the time of the first of them). A held-back
//! count is therefore reported with the sensor's next anomaly, not by a
//! timer: no note is ever published for a normal reading.
//!
//! # State
//!
//! [`Monitors`] holds every monitor task's sensors; it belongs to the
//! router's routing, so a configuration reload starts from empty windows.
//! It lives in memory only: after a restart the windows fill again (the
//! z-score and EWMA detectors are quiet for `min_samples` readings).
//! Readings are judged in the inbox's order, one at a time, before the
//! router hands the message on (see `router.rs`).

pub mod detect;
pub mod note;
pub mod reading;
pub mod settings;
pub mod window;

use std::collections::HashMap;
use std::sync::Mutex;

use detect::{Sample, SensorDetector};
use note::{Context, Facts};
use reading::Reading;
use settings::MonitorConfig;

/// Why a reading was refused; published as an error result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MonitorError {
    #[error("payload is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid UTF-8 (first bad byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("payload is not a JSON reading: {0}")]
    InvalidJson(String),
    #[error("no sensor name (a non-empty string) at {0}")]
    MissingSensor(String),
    #[error("no value at {0}")]
    MissingValue(String),
    #[error("the value at {0} is not a finite number")]
    BadValue(String),
    #[error("time stamp {0} is neither seconds since the epoch nor a UTC date and time")]
    BadTs(String),
    #[error("reading of {sensor} at {ts} is older than its last one ({last})")]
    OutOfOrder { sensor: String, ts: f64, last: f64 },
    #[error("already tracking {0} sensors (tasks.monitor.max_sensors)")]
    TooManySensors(usize),
}

impl MonitorError {
    /// Stable, machine-readable reason for the error result.
    pub fn reason(&self) -> &'static str {
        match self {
            MonitorError::TooLarge { .. } => "too_large",
            MonitorError::NotUtf8 { .. } => "not_utf8",
            MonitorError::InvalidJson(_) => "invalid_json",
            MonitorError::MissingSensor(_) => "missing_sensor",
            MonitorError::MissingValue(_) => "missing_value",
            MonitorError::BadValue(_) => "bad_value",
            MonitorError::BadTs(_) => "bad_ts",
            MonitorError::OutOfOrder { .. } => "out_of_order",
            MonitorError::TooManySensors(_) => "too_many_sensors",
        }
    }
}

/// The cooldown of one sensor (rule in the module doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cooldown {
    /// Time stamp of the sensor's last note.
    last_note: Option<f64>,
    /// Anomalies held back since then, and the first one's time stamp.
    held: u32,
    held_first: Option<f64>,
}

impl Cooldown {
    /// An anomaly at `ts`: `Some((count, first_ts))` when it publishes a
    /// note, `None` when it is held back.
    pub fn admit(&mut self, ts: f64, cooldown_secs: f64) -> Option<(u32, f64)> {
        if let Some(last) = self.last_note {
            if ts - last < cooldown_secs {
                self.held += 1;
                self.held_first.get_or_insert(ts);
                return None;
            }
        }
        let out = (self.held + 1, self.held_first.unwrap_or(ts));
        *self = Cooldown {
            last_note: Some(ts),
            held: 0,
            held_first: None,
        };
        Some(out)
    }
}

/// One sensor's state.
#[derive(Debug, Clone)]
struct Sensor {
    detector: SensorDetector,
    first_ts: f64,
    last_ts: f64,
    /// Time stamp of the last reading no detector fired on.
    last_normal: Option<f64>,
    cooldown: Cooldown,
}

/// What judging a reading came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Normal,
    /// Anomalous, counted by the cooldown, no note now.
    Held,
    /// Anomalous: publish a note with these facts.
    Note(Box<Facts>),
}

/// Every sensor of one monitor task.
#[derive(Debug)]
pub struct TaskMonitor {
    config: MonitorConfig,
    sensors: HashMap<String, Sensor>,
}

impl TaskMonitor {
    pub fn new(config: MonitorConfig) -> TaskMonitor {
        TaskMonitor {
            config,
            sensors: HashMap::new(),
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Judges one reading and learns from it.
    pub fn observe(&mut self, r: &Reading) -> Result<Verdict, MonitorError> {
        self.observe_with(r, |_| {})
    }

    /// [`TaskMonitor::observe`], letting `init` prepare a sensor's new
    /// detector (the evaluation primes it with a known baseline).
    pub fn observe_with(
        &mut self,
        r: &Reading,
        init: impl FnOnce(&mut SensorDetector),
    ) -> Result<Verdict, MonitorError> {
        if !self.sensors.contains_key(&r.sensor) {
            if self.sensors.len() >= self.config.max_sensors {
                return Err(MonitorError::TooManySensors(self.config.max_sensors));
            }
            let mut detector = SensorDetector::new(self.config.for_sensor(&r.sensor));
            init(&mut detector);
            self.sensors.insert(
                r.sensor.clone(),
                Sensor {
                    detector,
                    first_ts: r.ts,
                    last_ts: r.ts,
                    last_normal: None,
                    cooldown: Cooldown::default(),
                },
            );
        }
        let s = self.sensors.get_mut(&r.sensor).expect("inserted above");
        if r.ts < s.last_ts {
            return Err(MonitorError::OutOfOrder {
                sensor: r.sensor.clone(),
                ts: r.ts,
                last: s.last_ts,
            });
        }
        s.last_ts = r.ts;
        let sample = Sample {
            ts: r.ts,
            value: r.value,
        };
        let fired = s.detector.step(sample);
        if fired.is_empty() {
            s.last_normal = Some(r.ts);
            return Ok(Verdict::Normal);
        }
        let Some((count, first_ts)) = s.cooldown.admit(r.ts, self.config.cooldown_secs) else {
            return Ok(Verdict::Held);
        };
        let unit = r.unit.as_deref().or(s.detector.settings().unit.as_deref());
        let context = Context {
            sensor: &r.sensor,
            unit,
            sample,
            duration_s: r.ts - s.last_normal.unwrap_or(s.first_ts),
            count,
            first_ts,
        };
        Ok(Facts::new(&context, &fired).map_or(Verdict::Normal, |f| Verdict::Note(Box::new(f))))
    }
}

/// The monitor state of every monitor task of one configuration.
#[derive(Debug, Default)]
pub struct Monitors {
    /// By task name. A std mutex: judging a reading never awaits.
    tasks: HashMap<String, Mutex<TaskMonitor>>,
}

impl Monitors {
    /// For the monitor tasks among `tasks` (name, settings).
    pub fn new<'a>(
        tasks: impl IntoIterator<Item = (&'a str, Option<&'a settings::MonitorConfig>)>,
    ) -> Monitors {
        Monitors {
            tasks: tasks
                .into_iter()
                .filter_map(|(name, m)| {
                    Some((name.to_owned(), Mutex::new(TaskMonitor::new(m?.clone()))))
                })
                .collect(),
        }
    }

    /// Parses and judges a reading of `task`; `None` when it is not a
    /// monitor task.
    pub fn observe(
        &self,
        task: &str,
        payload: &[u8],
        max_bytes: usize,
        arrived: f64,
    ) -> Option<Result<Verdict, MonitorError>> {
        let m = self.tasks.get(task)?;
        let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
        let r = reading::parse(payload, m.config(), max_bytes, arrived);
        Some(r.and_then(|r| m.observe(&r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_publishes_the_first_and_counts_the_rest() {
        let mut c = Cooldown::default();
        assert_eq!(c.admit(100.0, 60.0), Some((1, 100.0)));
        assert_eq!(c.admit(110.0, 60.0), None);
        assert_eq!(c.admit(159.0, 60.0), None);
        // Out of the cooldown: this one and the two held back.
        assert_eq!(c.admit(170.0, 60.0), Some((3, 110.0)));
        assert_eq!(c.admit(300.0, 60.0), Some((1, 300.0)));
        let mut none = Cooldown::default();
        assert_eq!(none.admit(1.0, 0.0), Some((1, 1.0)));
        assert_eq!(none.admit(1.0, 0.0), Some((1, 1.0)));
    }

    fn monitor(cooldown: f64) -> TaskMonitor {
        TaskMonitor::new(
            toml::from_str(&format!(
                r#"
                window = 20
                min_samples = 10
                cooldown_secs = {cooldown}
                max_sensors = 2
                unit = "C"
                detectors = [{{ kind = "zscore", k = 4.0 }}, {{ kind = "threshold", max = 90.0 }}]
                "#
            ))
            .unwrap(),
        )
    }

    fn reading(sensor: &str, ts: f64, value: f64) -> Reading {
        Reading {
            sensor: sensor.into(),
            value,
            unit: None,
            ts,
        }
    }

    #[test]
    fn an_excursion_gives_one_note_then_a_counted_one() {
        let mut m = monitor(60.0);
        for i in 0..30 {
            let v = 65.0 + [0.0, 0.4, -0.3, 0.2, -0.5][i % 5];
            assert_eq!(
                m.observe(&reading("t", i as f64, v)).unwrap(),
                Verdict::Normal
            );
        }
        let Verdict::Note(f) = m.observe(&reading("t", 30.0, 92.0)).unwrap() else {
            panic!("no note")
        };
        assert_eq!((f.count, f.detector.as_str()), (1, "zscore"));
        assert_eq!(f.detectors, ["zscore", "threshold"]);
        assert_eq!(f.unit.as_deref(), Some("C"));
        assert_eq!(f.duration_s, 1.0);
        assert!((f.baseline.unwrap() - 65.0).abs() < 0.2);
        for ts in 31..40 {
            assert_eq!(
                m.observe(&reading("t", ts as f64, 93.0)).unwrap(),
                Verdict::Held
            );
        }
        // Back to normal, then a second excursion after the cooldown.
        for ts in 40..100 {
            assert_eq!(
                m.observe(&reading("t", ts as f64, 65.0)).unwrap(),
                Verdict::Normal
            );
        }
        let Verdict::Note(g) = m.observe(&reading("t", 100.0, 95.0)).unwrap() else {
            panic!("no second note")
        };
        assert_eq!((g.count, g.first_ts), (10, 31.0));
    }

    #[test]
    fn sensors_are_separate_and_bounded() {
        let mut m = monitor(60.0);
        m.observe(&reading("a", 10.0, 1.0)).unwrap();
        m.observe(&reading("b", 1.0, 1.0)).unwrap();
        assert_eq!(
            m.observe(&reading("c", 1.0, 1.0)).unwrap_err().reason(),
            "too_many_sensors"
        );
        assert_eq!(
            m.observe(&reading("a", 9.0, 1.0)).unwrap_err().reason(),
            "out_of_order"
        );
        // Same time stamp again is allowed.
        assert!(m.observe(&reading("a", 10.0, 1.0)).is_ok());
    }
}
