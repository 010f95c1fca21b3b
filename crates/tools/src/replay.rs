//! `slmd replay`: a recorded sensor file published as readings, for demos
//! and tests.
//!
//! The file is CSV with a header. One column is the time stamp (`timestamp`,
//! `ts` or `time`; seconds since the epoch or `YYYY-MM-DD HH:MM:SS`, as the
//! Numenta Anomaly Benchmark's files have it); every other column is a
//! sensor's values, named by its header (a single column called `value` is
//! named by `--sensor`, else by the file's stem). Each non-empty cell is one
//! reading `{"sensor", "value", "unit", "ts"}`.

use std::path::Path;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: {message}")]
    Csv { line: usize, message: String },
    #[error("broker: {0}")]
    Mqtt(String),
    #[error("{acked} of {sent} readings acknowledged within {secs} s")]
    Unacknowledged {
        sent: usize,
        acked: usize,
        secs: u64,
    },
}

/// One reading to publish, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub sensor: String,
    pub value: f64,
    pub ts: f64,
}

/// Reads the CSV text; `sensor` names a lone `value` column.
pub fn parse_csv(text: &str, sensor: &str) -> Result<Vec<Row>, ReplayError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or(ReplayError::Csv {
        line: 1,
        message: "empty file (a header is needed)".into(),
    })?;
    let names: Vec<&str> = header
        .split(',')
        .map(|c| c.trim().trim_matches('"'))
        .collect();
    let ts_col = names
        .iter()
        .position(|n| ["timestamp", "ts", "time"].contains(&n.to_ascii_lowercase().as_str()))
        .ok_or(ReplayError::Csv {
            line: 1,
            message: "no timestamp column (timestamp, ts or time) in the header".into(),
        })?;
    let sensors: Vec<(usize, String)> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ts_col)
        .map(|(i, n)| {
            let name = if n.eq_ignore_ascii_case("value") {
                sensor.to_owned()
            } else {
                (*n).to_owned()
            };
            (i, name)
        })
        .collect();
    if sensors.is_empty() {
        return Err(ReplayError::Csv {
            line: 1,
            message: "no value column".into(),
        });
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        let bad = |message: String| ReplayError::Csv {
            line: i + 1,
            message,
        };
        let cells: Vec<&str> = line
            .split(',')
            .map(|c| c.trim().trim_matches('"'))
            .collect();
        if cells.len() != names.len() {
            return Err(bad(format!(
                "{} cells; the header has {}",
                cells.len(),
                names.len()
            )));
        }
        let ts = slmd::monitor::reading::parse_time(cells[ts_col])
            .ok_or_else(|| bad(format!("bad time stamp {:?}", cells[ts_col])))?;
        for (col, name) in &sensors {
            let cell = cells[*col];
            if cell.is_empty() {
                continue;
            }
            let value = cell
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("bad value {cell:?} in column {name}")))?;
            rows.push(Row {
                sensor: name.clone(),
                value,
                ts,
            });
        }
    }
    Ok(rows)
}

/// The reading's JSON payload.
pub fn payload(row: &Row, unit: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({"sensor": row.sensor, "value": row.value, "ts": row.ts});
    if let Some(u) = unit {
        v["unit"] = u.into();
    }
    v.to_string().into_bytes()
}

/// Where and how fast to publish.
pub struct Options<'a> {
    pub host: &'a str,
    pub port: u16,
    pub topic: &'a str,
    /// Messages per second.
    pub rate: f64,
    pub unit: Option<&'a str>,
    /// How long to wait for the last acknowledgements.
    pub ack_timeout: Duration,
}

/// Reads `path`; the sensor of a lone `value` column is `sensor` or the
/// file's stem.
pub fn read(path: &Path, sensor: Option<&str>) -> Result<Vec<Row>, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sensor".into());
    parse_csv(&text, sensor.unwrap_or(&stem))
}

/// Publishes `rows` at QoS 1, `rate` per second, and waits until the broker
/// has acknowledged every one. Returns how many were acknowledged.
pub async fn publish(rows: &[Row], o: &Options<'_>) -> Result<usize, ReplayError> {
    let id = format!("slmd-replay-{}", std::process::id());
    let mut opts = MqttOptions::new(id, o.host, o.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (acks_tx, mut acks) = tokio::sync::watch::channel((0usize, None::<String>));
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    let _ = acks_tx.send((acked, None));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    let _ = acks_tx.send((acked, Some(e.to_string())));
                    return;
                }
            }
        }
    });
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for row in rows {
        tick.tick().await;
        if let Some(e) = acks.borrow().1.clone() {
            return Err(ReplayError::Mqtt(e));
        }
        client
            .publish(o.topic, QoS::AtLeastOnce, false, payload(row, o.unit))
            .await
            .map_err(|e| ReplayError::Mqtt(e.to_string()))?;
    }
    let sent = rows.len();
    let waited = tokio::time::timeout(o.ack_timeout, async {
        loop {
            let (n, err) = acks.borrow_and_update().clone();
            if n >= sent {
                return Ok(n);
            }
            if let Some(e) = err {
                return Err(ReplayError::Mqtt(e));
            }
            if acks.changed().await.is_err() {
                return Err(ReplayError::Mqtt("connection closed".into()));
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    match waited {
        Ok(r) => r,
        Err(_) => Err(ReplayError::Unacknowledged {
            sent,
            acked: acks.borrow().0,
            secs: o.ack_timeout.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nab_layout() {
        let rows = parse_csv(
            "timestamp,value\n2014-04-01 00:00:00,18.3\n2014-04-01 00:05:00,21\n",
            "temp",
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                Row {
                    sensor: "temp".into(),
                    value: 18.3,
                    ts: 1_396_310_400.0
                },
                Row {
                    sensor: "temp".into(),
                    value: 21.0,
                    ts: 1_396_310_700.0
                },
            ]
        );
    }

    #[test]
    fn named_columns_are_sensors_and_empty_cells_are_skipped() {
        let rows = parse_csv("ts,spindle_temp,vibration\n10,65.1,2.0\n11,,2.5\n", "x").unwrap();
        let got: Vec<(&str, f64, f64)> = rows
            .iter()
            .map(|r| (r.sensor.as_str(), r.ts, r.value))
            .collect();
        assert_eq!(
            got,
            [
                ("spindle_temp", 10.0, 65.1),
                ("vibration", 10.0, 2.0),
                ("vibration", 11.0, 2.5)
            ]
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        let line = |t: &str| match parse_csv(t, "s").unwrap_err() {
            ReplayError::Csv { line, .. } => line,
            e => panic!("{e}"),
        };
        assert_eq!(line(""), 1);
        assert_eq!(line("value\n1\n"), 1);
        assert_eq!(line("ts,value\n1,2\n2,hot\n"), 3);
        assert_eq!(line("ts,value\n1,2,3\n"), 2);
        assert_eq!(line("ts,value\nnoon,2\n"), 2);
    }

    #[test]
    fn payload_is_a_reading() {
        let p = payload(
            &Row {
                sensor: "t".into(),
                value: 1.5,
                ts: 3.0,
            },
            Some("C"),
        );
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"sensor":"t","value":1.5,"unit":"C","ts":3.0})
        );
    }
}
