//! A sensor reading out of a message payload, by the task's JSON pointers.

use super::settings::MonitorConfig;
use super::MonitorError;

/// One parsed reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub sensor: String,
    pub value: f64,
    pub unit: Option<String>,
    /// Seconds since the epoch (the arrival time when the reading had none).
    pub ts: f64,
}

/// Parses `payload` (JSON) with the pointers of `cfg`; `arrived` (seconds)
/// stands in for a missing time stamp.
pub fn parse(
    payload: &[u8],
    cfg: &MonitorConfig,
    max_bytes: usize,
    arrived: f64,
) -> Result<Reading, MonitorError> {
    if payload.len() > max_bytes {
        return Err(MonitorError::TooLarge {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(payload).map_err(|e| MonitorError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| MonitorError::InvalidJson(e.to_string()))?;
    let sensor = match v.pointer(&cfg.sensor_pointer) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => return Err(MonitorError::MissingSensor(cfg.sensor_pointer.clone())),
    };
    let value = match v.pointer(&cfg.value_pointer) {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        None | Some(serde_json::Value::Null) => {
            return Err(MonitorError::MissingValue(cfg.value_pointer.clone()))
        }
        Some(_) => None,
    }
    .filter(|x| x.is_finite())
    .ok_or_else(|| MonitorError::BadValue(cfg.value_pointer.clone()))?;
    let unit = match v.pointer(&cfg.unit_pointer) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    };
    let ts = match v.pointer(&cfg.ts_pointer) {
        None | Some(serde_json::Value::Null) => arrived,
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| MonitorError::BadTs(n.to_string()))?,
        Some(serde_json::Value::String(s)) => {
            parse_time(s).ok_or_else(|| MonitorError::BadTs(s.clone()))?
        }
        Some(other) => return Err(MonitorError::BadTs(other.to_string())),
    };
    Ok(Reading {
        sensor,
        value,
        unit,
        ts,
    })
}

/// Seconds since the epoch of `YYYY-MM-DD[ T]HH:MM:SS[.fff][Z|+00:00]`
/// (UTC; other offsets are refused) or of a number in a string.
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        return (n.is_finite() && n >= 0.0).then_some(n);
    }
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("+00:00"))
        .unwrap_or(s);
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let mut t = time.split(':');
    let (h, mi): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: f64 = t.next().unwrap_or("0").parse().ok()?;
    if d.next().is_some()
        || t.next().is_some()
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    let days = days_from_civil(y, m, day);
    Some((days * 86400 + h * 3600 + mi * 60) as f64 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// well-known algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> MonitorConfig {
        toml::from_str(&format!(
            "detectors = [{{ kind = \"zscore\", k = 3.0 }}]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn times_in_the_usual_spellings() {
        assert_eq!(parse_time("1970-01-02 00:00:00"), Some(86400.0));
        assert_eq!(parse_time("2014-04-01T00:05:00Z"), Some(1_396_310_700.0));
        assert_eq!(parse_time("2014-04-01 00:05:00.5"), Some(1_396_310_700.5));
        assert_eq!(parse_time("1700000000.25"), Some(1_700_000_000.25));
        assert_eq!(parse_time("2014-13-01 00:00:00"), None);
        assert_eq!(parse_time("2014-04-01 00:05:00+02:00"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn default_pointers() {
        let r = parse(
            br#"{"sensor":"spindle_temp","value":65.5,"unit":"C","ts":1700000000}"#,
            &cfg(""),
            1000,
            5.0,
        )
        .unwrap();
        assert_eq!(r.sensor, "spindle_temp");
        assert_eq!((r.value, r.ts), (65.5, 1_700_000_000.0));
        assert_eq!(r.unit.as_deref(), Some("C"));
        // No time stamp: the arrival time; a value in a string.
        let r = parse(br#"{"sensor":"a","value":"1.5"}"#, &cfg(""), 1000, 5.0).unwrap();
        assert_eq!((r.value, r.ts, r.unit), (1.5, 5.0, None));
    }

    #[test]
    fn configured_pointers() {
        let c = cfg(r#"
            sensor_pointer = "/meta/id"
            value_pointer = "/data/0/v"
            ts_pointer = "/time"
        "#);
        let r = parse(
            br#"{"meta":{"id":"vib"},"data":[{"v":3}],"time":"2014-04-01 00:05:00"}"#,
            &c,
            1000,
            0.0,
        )
        .unwrap();
        assert_eq!((r.sensor.as_str(), r.value), ("vib", 3.0));
        assert_eq!(r.ts, 1_396_310_700.0);
    }

    #[test]
    fn malformed_readings_have_reasons() {
        let c = cfg("");
        let reason = |p: &[u8]| parse(p, &c, 64, 0.0).unwrap_err().reason();
        assert_eq!(reason(b"not json"), "invalid_json");
        assert_eq!(reason(b"\xff\xfe"), "not_utf8");
        assert_eq!(reason(br#"{"value":1}"#), "missing_sensor");
        assert_eq!(reason(br#"{"sensor":"a"}"#), "missing_value");
        assert_eq!(reason(br#"{"sensor":"a","value":"hot"}"#), "bad_value");
        assert_eq!(reason(br#"{"sensor":"a","value":[1]}"#), "bad_value");
        assert_eq!(reason(br#"{"sensor":"a","value":1,"ts":"soon"}"#), "bad_ts");
        assert_eq!(reason(&[b' '; 65]), "too_large");
    }
}
