//! The vehicle's state as the policies see it: the last speed each state
//! topic reported, and when.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::PolicyConfig;
use slmd_core::topic;

/// The last speed (km/h) each policy state topic reported, and when.
#[derive(Default)]
pub struct Speeds(Mutex<HashMap<String, (f64, Instant)>>);

/// What a vehicle state report must look like.
pub const STATE_FORMAT: &str = "a vehicle state is {\"speed_kmh\": <number >= 0>}";

impl Speeds {
    /// Takes a state report `{"speed_kmh": N}` published on `topic`;
    /// `Err` names the expected format when it cannot be read.
    pub fn report(&self, topic: &str, payload: &[u8]) -> Result<(), &'static str> {
        let speed = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("speed_kmh")?.as_f64())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .ok_or(STATE_FORMAT)?;
        let now = Instant::now();
        self.0
            .lock()
            .unwrap()
            .insert(topic.to_owned(), (speed, now));
        Ok(())
    }

    /// The freshest speed reported on `policy`'s state topic, if recent.
    pub fn latest(&self, policy: &PolicyConfig) -> Option<f64> {
        let filter = policy.state_topic.as_deref()?;
        let max_age = Duration::from_secs(policy.state_max_age_secs);
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, (_, at))| topic::matches(filter, t) && at.elapsed() <= max_age)
            .max_by_key(|(_, (_, at))| *at)
            .map(|(_, (s, _))| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(age: u64) -> PolicyConfig {
        let text = format!(
            "state_topic = \"car/+/state\"\nstate_max_age_secs = {age}\ndefault = \"confirm\"\n"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn the_freshest_matching_report_counts_and_bad_ones_are_refused() {
        let speeds = Speeds::default();
        assert_eq!(speeds.latest(&policy(60)), None);
        speeds
            .report("car/a/state", br#"{"speed_kmh": 30}"#)
            .unwrap();
        speeds
            .report("other/state", br#"{"speed_kmh": 99}"#)
            .unwrap();
        assert_eq!(speeds.latest(&policy(60)), Some(30.0));
        speeds
            .report("car/b/state", br#"{"speed_kmh": 0.0}"#)
            .unwrap();
        assert_eq!(speeds.latest(&policy(60)), Some(0.0));
        for bad in [
            &br#"{"speed_kmh": -1}"#[..],
            b"{}",
            b"fast",
            br#"{"speed_kmh": "9"}"#,
        ] {
            assert_eq!(speeds.report("car/a/state", bad), Err(STATE_FORMAT));
        }
        assert_eq!(speeds.latest(&policy(60)), Some(0.0));
    }

    #[test]
    fn a_stale_speed_is_unknown() {
        let speeds = Speeds::default();
        speeds
            .report("car/a/state", br#"{"speed_kmh": 10}"#)
            .unwrap();
        // A maximum age of 0 s: any time at all makes the report stale.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(speeds.latest(&policy(0)), None);
        assert_eq!(speeds.latest(&policy(60)), Some(10.0));
    }
}
